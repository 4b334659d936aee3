"""`pg-assets writer`: a steady write load on the demo's incremental table `public.payments`.

Each second it inserts `--rate` payments and updates `--updates` existing ones (status,
amount, `updated_at = now()`), in small transactions like an application would. Every
`--long-every` seconds one more transaction inserts a payment and stays open `--long-s`
seconds before committing: its row carries the transaction's start time, so while it is open
the sensor reports the watermark held by it, and the batch after its commit takes its row.
Turn on the sensor `demo__public__payments__sensor` in the UI (`pg-assets dev`) to watch.
"""

import argparse
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

PAYMENTS_DDL = """
CREATE TABLE IF NOT EXISTS public.payments (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id integer NOT NULL,
    amount      numeric(12,2) NOT NULL,
    status      text NOT NULL,
    note        text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS payments_updated_at ON public.payments (updated_at);
"""

_INSERT = """
INSERT INTO public.payments (customer_id, amount, status, note)
SELECT 1 + (random() * 3499)::int, round((random() * 500)::numeric, 2), 'new',
       (ARRAY[NULL, '', 'card, 3-D "secure"', E'split\\npayment', 'Überweisung ✓'])[1 + g %% 5]
FROM generate_series(1, %s) g
"""

_UPDATE = """
UPDATE public.payments
SET status = (ARRAY['paid', 'refunded', 'disputed'])[1 + (random() * 2)::int],
    amount = amount + 1, updated_at = now()
WHERE id IN (SELECT id FROM public.payments TABLESAMPLE SYSTEM (1) LIMIT %s)
"""


def create_payments(conn: psycopg.Connection, rows: int = 5000) -> None:
    """The demo's incremental table, with `rows` payments if it is empty."""
    conn.execute(PAYMENTS_DDL)
    if conn.execute("SELECT NOT EXISTS (SELECT FROM public.payments)").fetchone() == (True,):
        conn.execute(_INSERT, (rows,))


def run_writer(
    conninfo: str,
    *,
    rate: int = 20,
    updates: int = 10,
    seconds: float = 0,
    long_every: float = 60,
    long_s: float = 20,
    say: Callable[[str], None] = print,
) -> dict[str, int]:
    """Write until `seconds` have passed (0: until interrupted). Returns what was written."""
    stop = threading.Event()
    counts = {"inserted": 0, "updated": 0, "long": 0}
    errors: list[BaseException] = []

    def long_transactions() -> None:
        try:
            with psycopg.connect(conninfo, application_name="pg_assets writer (long)") as c:
                while not stop.wait(long_every):
                    c.execute(_INSERT, (1,))
                    say(f"long transaction open for {long_s:g} s (its row has now() = its start)")
                    stop.wait(long_s)
                    c.commit()
                    counts["long"] += 1
        except BaseException as e:
            errors.append(e)
            stop.set()

    with psycopg.connect(conninfo, application_name="pg_assets writer") as c:
        create_payments(c)
        c.commit()
        helper = threading.Thread(target=long_transactions, daemon=True)
        helper.start()
        started = last_report = time.monotonic()
        try:
            while not stop.is_set() and (not seconds or time.monotonic() - started < seconds):
                tick = time.monotonic()
                with c.transaction():
                    counts["inserted"] += c.execute(_INSERT, (rate,)).rowcount
                with c.transaction():
                    counts["updated"] += c.execute(_UPDATE, (updates,)).rowcount
                if tick - last_report >= 10:
                    last_report = tick
                    say(
                        f"inserted {counts['inserted']}, updated {counts['updated']}, "
                        f"long transactions {counts['long']}"
                    )
                stop.wait(max(0.0, 1 - (time.monotonic() - tick)))
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
            helper.join(long_s + 10)
    if errors:
        raise errors[0]
    return counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=int, default=20, help="payments inserted per second")
    p.add_argument("--updates", type=int, default=10, help="payments updated per second")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")
    p.add_argument("--long-every", type=float, default=60,
                   help="seconds between long transactions")  # fmt: skip
    p.add_argument("--long-s", type=float, default=20, help="how long each stays open")


def demo_batches(config: Any, defs: Any, instance: Any) -> int:
    """`pg-assets demo`: the next batch of each incremental table (batch 0 the first time).
    Returns the number of failed runs."""
    from pg_assets.assets.incremental import incremental_key

    failed = 0
    job = defs.resolve_implicit_global_asset_job_def()
    for table in config.tables_of("incremental"):
        key = incremental_key(config, table)
        result = job.execute_in_process(
            asset_selection=[key],
            instance=instance,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        name = key.to_user_string()
        if not result.success:
            failed += 1
            print(f"FAILED {name}: see the run in the UI")
            continue
        events = result.get_asset_materialization_events()
        if not events:
            print(f"{name:<28} no new batch (nothing above the watermark)")
        for event in events:
            m = {k: v.value for k, v in event.materialization.metadata.items()}
            print(
                f"{name:<28} batch {m['batch']:<5} {m['rows']:>8} rows, watermark "
                f"{m['watermark_low']} .. {m['watermark_high']}"
            )
    if config.tables_of("incremental"):
        print(
            "\nIncremental tables get new batches from their sensors: start `pg-assets dev`, turn "
            "on the sensor in the UI (Automation), and run `pg-assets writer` in another terminal."
        )
    return failed

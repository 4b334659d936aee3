"""CDC decoding throughput against the server's own decoding limit, in one run.

    .venv/bin/python -m bench.cdc [--rows 1000000] [--small 100000]

Starts the embedded PostgreSQL (or uses $PG_ASSETS_CONNINFO), then for (a) one transaction
of N rows and (b) M single-row transactions, each in its own process on the same pending
changes:

    server     SELECT count(*) FROM pg_logical_slot_peek_binary_changes(...): the limit
    fetch      the named cursor alone (rows reach Python, nothing decoded)
    decode     + pgoutput decoding
    core       + change CSV + gzip level 1 (`read_batch`, blocks discarded): what a run does

printing seconds, changes/s, ratio to `server`, and the process's peak RSS.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SLOT = PUB = "bench_cdc"
PEEK = (
    "pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1',"
    " 'publication_names', %s)"
)


class _Null:
    def __init__(self) -> None:
        self.bytes = 0

    def write(self, block: bytes, /) -> None:
        self.bytes += len(block)


def peak_rss_mb() -> float:
    """VmHWM belongs to this address space; ru_maxrss would include the forking parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(conninfo: str, method: str) -> dict:
    from pg_assets.core.cdc.pgoutput import decode
    from pg_assets.core.cdc.reader import iter_messages, read_batch
    from pg_assets.core.compression import get_codec

    started = time.perf_counter()
    out: dict = {"method": method}
    with psycopg.connect(conninfo) as conn:
        if method == "server":
            (out["messages"],) = conn.execute(
                f"SELECT count(*) FROM {PEEK}",  # noqa: S608 - constant
                [SLOT, PUB],
            ).fetchone()  # type: ignore[misc]
        elif method in ("fetch", "decode"):
            n = 0
            with conn.transaction():
                for _, data in iter_messages(conn, SLOT, PUB):
                    if method == "decode":
                        decode(data)
                    n += 1
            out["messages"] = n
        else:
            sinks: list[_Null] = []

            def open_part(table, part):
                sinks.append(_Null())
                return sinks[-1]

            batch = read_batch(
                conn, SLOT, PUB, open_part, lambda: get_codec("gzip").compressor(1),
                max_messages=None,
            )  # fmt: skip
            out["messages"] = batch.messages
            out["changes"] = batch.changes
            out["raw_bytes"] = sum(f.raw_bytes for f in batch.files)
            out["compressed_bytes"] = sum(s.bytes for s in sinks)
    out["seconds"] = time.perf_counter() - started
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _wait_flushed(conn: psycopg.Connection) -> None:
    (target,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()  # type: ignore[misc]
    deadline = time.monotonic() + 60
    while not conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", [target]).fetchone()[
        0
    ]:  # type: ignore[index]
        if time.monotonic() > deadline:
            raise TimeoutError("WAL not flushed")
        time.sleep(0.05)


def prepare(conn: psycopg.Connection, kind: str, n: int) -> int:
    conn.execute("DROP TABLE IF EXISTS bench_cdc_events")
    if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [SLOT]).fetchone():
        conn.execute("SELECT pg_drop_replication_slot(%s)", [SLOT])
    conn.execute("DROP PUBLICATION IF EXISTS bench_cdc")
    conn.execute(
        "CREATE TABLE bench_cdc_events (event_id bigint PRIMARY KEY, occurred_at timestamptz,"
        " kind text, payload jsonb, score double precision, ok boolean, ref uuid)"
    )
    conn.execute(
        "CREATE PUBLICATION bench_cdc FOR TABLE bench_cdc_events"
        " WITH (publish_via_partition_root = true)"
    )
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [SLOT])
    row = (
        "g, '2026-11-01'::timestamptz + g * interval '37 seconds', (ARRAY['view','click','buy'])"
        "[1 + mod(g, 3)], jsonb_build_object('path', '/p/' || mod(g, 500), 'ua', 'Mozilla/5.0 \"x\"'),"
        " mod(g, 1000) / 7.0, mod(g, 2) = 0, md5(g::text)::uuid"
    )
    if kind == "one":
        insert = f"INSERT INTO bench_cdc_events SELECT {row} FROM generate_series(1, %s) g"  # noqa: S608
        conn.execute(insert, [n])
    else:
        conn.execute(
            "CREATE OR REPLACE PROCEDURE bench_cdc_fill(n int) LANGUAGE plpgsql AS $$"
            f" BEGIN FOR g IN 1..n LOOP INSERT INTO bench_cdc_events SELECT {row}; COMMIT;"  # noqa: S608
            " END LOOP; END $$"
        )
        conn.execute("CALL bench_cdc_fill(%s)", [n])
    _wait_flushed(conn)
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--child", nargs=2, metavar=("CONNINFO", "METHOD"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    conninfo = os.environ.get("PG_ASSETS_CONNINFO")
    if not conninfo:
        from pg_assets.dev.embedded import start

        conninfo = start(ROOT / ".pg_assets" / "bench").conninfo
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for kind, n in (("one", args.rows), ("small", args.small)):
            label = f"1 transaction of {n:,} rows" if kind == "one" else f"{n:,} 1-row transactions"
            prepare(conn, kind, n)
            print(f"\n{label}")
            base = None
            for method in ("server", "fetch", "decode", "core"):
                out = subprocess.run(
                    [sys.executable, "-m", "bench.cdc", "--child", conninfo, method],
                    check=True, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600,
                )  # fmt: skip
                r = json.loads(out.stdout)
                base = base or r["seconds"]
                extra = ""
                if method == "core":
                    extra = (
                        f"  {r['raw_bytes'] / 1e6:.0f} MB CSV → {r['compressed_bytes'] / 1e6:.0f}"
                        " MB gzip"
                    )
                print(
                    f"  {method:7} {r['seconds']:7.2f} s  {n / r['seconds']:>10,.0f} changes/s"
                    f"  ×{r['seconds'] / base:4.2f}  peak RSS {r['peak_rss_mb']:5.0f} MB"
                    f"  ({r['messages']:,} messages){extra}"
                )
        conn.execute("SELECT pg_drop_replication_slot(%s)", [SLOT])
        conn.execute("DROP PUBLICATION bench_cdc")
        conn.execute("DROP TABLE bench_cdc_events")


if __name__ == "__main__":
    main()

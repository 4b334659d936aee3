"""Memory and speed of the typed reader (`pg_assets.read`) on real Bronze days.

    .venv/bin/python -m bench.read [--rows 2000000] [--small 200000]

Starts the embedded PostgreSQL (or uses $PG_ASSETS_CONNINFO), creates two days of demo
orders (`--small` and `--rows` rows) in `bench_read.orders`, extracts both into a local
Bronze root with the project's own extractor, then reads them, each way in its own process
so its peak RSS (VmHWM) is its own:

    imports only           python + pyarrow + pg_assets.read: the floor
    read_batches, 1 day    streaming the small day, batch after batch, nothing kept
    read_batches, 1 day    the same on the big day: should match the small day
    read_batches, 2 days   both days in one stream: still one block of one day at a time
    read_table, 1 day      the big day materialized as one Arrow table, for comparison

Prints one line per way: rows, seconds, rows/s, MB of CSV per second, peak RSS.
"""

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAY0 = dt.date(2026, 9, 1)
TABLE = "bench_read.orders"


def _child(mode: str, root: str, days: list[str]) -> None:
    from pg_assets import read
    from pg_assets.core.extract import peak_rss_mb

    if mode == "none":
        print(json.dumps({"rows": 0, "seconds": 0, "raw_bytes": 0, "peak_rss_mb": peak_rss_mb()}))
        return
    started = time.perf_counter()
    rows = 0
    first, last = min(days, default=None), max(days, default=None)
    if mode == "batches":
        for batch in read.read_batches(root, "bench", TABLE, start=first, end=last):
            rows += batch.num_rows
    elif mode == "table":
        rows = read.read_table(root, "bench", TABLE, start=first, end=last).num_rows
    seconds = time.perf_counter() - started
    raw = sum(
        d.manifest["raw_bytes"]
        for d in read.committed_days(root, "bench", TABLE, start=first, end=last)
    )
    out = {"rows": rows, "seconds": seconds, "raw_bytes": raw}
    print(json.dumps({**out, "peak_rss_mb": peak_rss_mb()}))


def _run(args: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.read", *args],
        check=True, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--small", type=int, default=200_000)
    ap.add_argument("--root", default=str(ROOT / ".pg_assets" / "bench_read"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--days", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.root, [d for d in args.days.split(",") if d])
        return 0

    import psycopg

    from pg_assets.dev.demo_data import create_daily_partitioned, insert_orders

    conninfo = os.environ.get("PG_ASSETS_CONNINFO")
    if not conninfo:
        from pg_assets.dev.embedded import start

        conninfo = start(ROOT / ".pg_assets").conninfo
    small, big = DAY0, DAY0 + dt.timedelta(days=1)
    with psycopg.connect(conninfo, autocommit=True) as c:
        print(f"loading {TABLE}: {args.small:,} and {args.rows:,} rows ...", flush=True)
        create_daily_partitioned(c, "bench_read", "orders", [small, big], 0)
        from psycopg import sql

        parent = sql.Identifier("bench_read", "orders")
        insert_orders(c, parent, small, args.small, 0)
        insert_orders(c, parent, big, args.rows, 100_000_000)
        c.execute("VACUUM ANALYZE bench_read.orders")
    env = {**os.environ, "PG_ASSETS_CONNINFO": conninfo, "PYTHONWARNINGS": "ignore"}
    for day in (small, big):
        subprocess.run(
            [sys.executable, "-m", "pg_assets.core.extract", "--table", TABLE,
             "--column", "order_date", "--day", day.isoformat(), "--root", args.root,
             "--source", "bench"],
            check=True, capture_output=True, env=env, cwd=ROOT, timeout=3600,
        )  # fmt: skip
    ways = [
        ("imports only", "none", []),
        (f"read_batches, 1 day of {args.small:,}", "batches", [small]),
        (f"read_batches, 1 day of {args.rows:,}", "batches", [big]),
        (f"read_batches, 2 days ({args.small + args.rows:,})", "batches", [small, big]),
        (f"read_table, 1 day of {args.rows:,}", "table", [big]),
    ]
    print(f"\n{'way':<36} {'rows':>10} {'s':>7} {'rows/s':>10} {'CSV MB/s':>9} {'peak RSS MB':>12}")
    for name, mode, days in ways:
        r = _run(["--child", mode, "--root", args.root,
                  "--days", ",".join(d.isoformat() for d in days)], env)  # fmt: skip
        rate = r["rows"] / r["seconds"] if r["rows"] else 0
        mbs = r["raw_bytes"] / 1e6 / r["seconds"] if r["rows"] else 0
        print(
            f"{name:<36} {r['rows']:>10,} {r['seconds']:>7.1f} {rate:>10,.0f} {mbs:>9.1f} "
            f"{r['peak_rss_mb']:>12.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

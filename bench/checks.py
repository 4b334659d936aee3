"""What the checks cost: read-back against extraction, and the late-data sensor's tick.

    .venv/bin/python -m bench.checks [--rows 2000000] [--runs 3] [--year-rows 5000]

Starts the embedded PostgreSQL (or uses $PG_ASSETS_CONNINFO) and prints:

1. **bronze_readable vs extraction** on the same day of `--rows` rows (the benchmark's 2M-row
   day): the extraction (`extract_day`: COPY → gzip:1 → local file) and the read-back
   (`read_back`: file → sha256 → streaming gunzip → CSV record count), interleaved `--runs`
   times; the same read-back through the loopback ADLS test server; `matches_source`'s
   count(*) (and with the content hash) of the day.
2. **The late-data sensor's tick** on a 365-day table (one child per day, `--year-rows` rows
   each, every day extracted): the whole tick as the daemon evaluates it (a window of 30 and
   of 365 days), and its parts: reading the window's manifests (local, loopback ADLS) and the
   one grouped recount query.

Timing on this shared 2-core machine is noisy: each figure is the median of `--runs`.
"""

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pg_assets.core.compression import get_codec
from pg_assets.core.extract import extract_day
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths
from pg_assets.core.planner import describe_table, plan_day
from pg_assets.core.session import connect_kwargs
from pg_assets.core.verify import count_day, read_back
from pg_assets.sinks.local import LocalSink

ROOT = Path(__file__).resolve().parent.parent
DAY = dt.date(2026, 3, 1)
YESTERDAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
YEAR = [
    YESTERDAY - dt.timedelta(days=n) for n in range(364, -1, -1)
]  # the sensor's window ends yesterday
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    times, last = [], None
    for _ in range(runs):
        t = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), last


def connect(conninfo: str) -> psycopg.Connection:
    conn = psycopg.connect(conninfo, **connect_kwargs(10, 0))
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    return conn


def prepare(conninfo: str, rows: int, year_rows: int) -> None:
    from pg_assets.dev.demo_data import create_daily_partitioned, insert_orders

    with psycopg.connect(conninfo, autocommit=True) as c:

        def count(rel: str) -> int:
            row = c.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.SQL(rel))  # noqa: S608 - constant
            ).fetchone()
            return int(row[0]) if row else 0

        def exists(rel: str) -> bool:
            return c.execute("SELECT to_regclass(%s)", (rel,)).fetchone()[0] is not None  # type: ignore[index]

        if not exists("benchchk.day") or count("benchchk.day") != rows:
            print(f"loading benchchk.day: {rows:,} rows ...", flush=True)
            create_daily_partitioned(c, "benchchk", "day", [DAY], 0, default_partition=False)
            insert_orders(c, sql.Identifier("benchchk", "day"), DAY, rows, 0)
            c.execute("VACUUM ANALYZE benchchk.day")
        last_child = f"benchchk.year_{YESTERDAY:%Y_%m_%d}"
        if not exists(last_child) or count("benchchk.year") != 365 * year_rows:
            print(f"loading benchchk.year: 365 days x {year_rows:,} rows ...", flush=True)
            create_daily_partitioned(c, "benchchk", "year", YEAR, year_rows)
            c.execute("VACUUM ANALYZE benchchk.year")


def bench_read_back(conninfo: str, rows: int, runs: int, adls_url: str) -> None:
    name = QualifiedName("benchchk", "day")
    codec = get_codec("gzip")
    with tempfile.TemporaryDirectory(prefix="bench_checks_") as tmp:
        sink = LocalSink(tmp)
        folder = daily_paths("bench", name, DAY).folder
        extract_s, read_s = [], []
        result = None
        for _ in range(runs):  # interleaved, so both see the same machine load
            with connect(conninfo) as conn:
                t = time.perf_counter()
                result = extract_day(
                    conn, source="bench", table=name, column="order_date", day=DAY,
                    timezone="UTC", sink=sink, codec=codec, level=1, run_id="bench" * 6,
                )  # fmt: skip
                extract_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = read_back(sink, folder, result.manifest)
            read_s.append(time.perf_counter() - t)
            assert r.ok, r.problems
        assert result is not None
        m = result.manifest
        ex, rb = statistics.median(extract_s), statistics.median(read_s)
        raw_mb, comp_mb = m["raw_bytes"] / 1e6, m["compressed_bytes"] / 1e6
        print(f"\n== bronze_readable vs extraction: {rows:,} rows, {raw_mb:.0f} MB CSV, "
              f"{comp_mb:.0f} MB gzip:1 (median of {runs})")  # fmt: skip
        print(f"extraction (COPY → gzip:1 → local)   {ex:7.2f} s  {raw_mb / ex:7.0f} MB/s CSV"
              f"  {rows / ex / 1e6:5.2f} M rows/s")  # fmt: skip
        print(f"read-back  (local → sha256+gunzip+count) {rb:5.2f} s  {raw_mb / rb:7.0f} MB/s CSV"
              f"  {rows / rb / 1e6:5.2f} M rows/s  = {rb / ex:.2f}x the extraction")  # fmt: skip
        budget = 8 << 20
        tb, rpart = median_time(lambda: read_back(sink, folder, m, byte_budget=budget), runs)
        print(f"read-back with an 8 MiB budget        {tb:7.2f} s  ({rpart.part_checked()[:60]}…)")  # type: ignore[union-attr]

        from pg_assets.resources.bronze import AdlsSettings
        from pg_assets.sinks.adls import AdlsSink

        adls = AdlsSink.from_uri(
            "abfss://bronze@devstoreaccount1.dfs.core.windows.net/lake",
            **AdlsSettings(auth="account_key", secret_env="BENCH_ADLS_KEY", endpoint=adls_url,
                           create_filesystem=True).model_dump(),
        )  # fmt: skip
        rel = f"{folder}/{m['file']}"
        data = (Path(tmp) / rel).read_bytes()
        adls.write_bytes("bench", rel, data, codec.content_type)
        del data
        ta, ra = median_time(lambda: read_back(adls, folder, m), runs)
        assert ra.ok, ra.problems  # type: ignore[union-attr]
        streamed = "open_read" if hasattr(adls, "open_read") else "read_bytes (whole file)"
        print(
            f"read-back from ADLS (loopback, {streamed}) {ta:5.2f} s  {raw_mb / ta:7.0f} MB/s CSV"
        )

        with connect(conninfo) as conn:
            info = describe_table(conn, name, "order_date")
            plan = plan_day(info, DAY, "UTC")
            names = [c.name for c in info.columns]
            tc, _ = median_time(
                lambda: (count_day(conn, plan, "order_date"), conn.rollback()), runs
            )
            th, _ = median_time(
                lambda: (count_day(conn, plan, "order_date", names), conn.rollback()), runs
            )
        print(f"matches_source count(*)               {tc:7.2f} s")
        print(f"matches_source count + content hash   {th:7.2f} s  (also paid once at extraction "
              "with checks.content_hash)")  # fmt: skip


def bench_sensor(conninfo: str, year_rows: int, runs: int, adls_url: str) -> None:

    name = QualifiedName("benchchk", "year")
    with tempfile.TemporaryDirectory(prefix="bench_sensor_") as tmp:
        sink = LocalSink(Path(tmp) / "bronze")
        print(f"\n== late-data sensor: 365 days x {year_rows:,} rows; extracting every day ...",
              flush=True)  # fmt: skip
        codec = get_codec("gzip")
        with connect(conninfo) as conn:
            info = describe_table(conn, name, "order_date")
            t = time.perf_counter()
            for day in YEAR:
                extract_day(
                    conn, source="bench", table=name, column="order_date", day=day,
                    timezone="UTC", sink=sink, codec=codec, level=1, run_id="bench" * 6,
                    info=info,
                )  # fmt: skip
            print(f"extracted 365 days in {time.perf_counter() - t:.1f} s")
        from pg_assets.resources.bronze import AdlsSettings
        from pg_assets.sinks.adls import AdlsSink

        adls = AdlsSink.from_uri(
            "abfss://bronze@devstoreaccount1.dfs.core.windows.net/lake",
            **AdlsSettings(auth="account_key", secret_env="BENCH_ADLS_KEY", endpoint=adls_url,
                           create_filesystem=True).model_dump(),
        )  # fmt: skip
        for day in YEAR:  # the same manifests on ADLS, to time reading them there
            rel = daily_paths("bench", name, day).manifest
            adls.write_bytes("bench", rel, sink.read_bytes(rel), "application/json")

        for window in (30, 365):
            _sensor_window(conninfo, Path(tmp), sink, adls, window, runs)


def _sensor_window(conninfo: str, tmp: Path, sink: Any, adls: Any, window: int, runs: int) -> None:
    import yaml
    from dagster import DagsterInstance, build_sensor_context

    from pg_assets.build import build_definitions
    from pg_assets.checks import day_checks_for
    from pg_assets.config import load_config
    from pg_assets.sensors.late_data import find_changes, read_manifests

    cfg_path = tmp / f"w{window}.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "source": "bench",
        "bronze": {"root": str(tmp / "bronze")},
        "checks": {"window_days": window, "freshness_deadline": None},
        "tables": [{"table": "benchchk.year", "partition_column": "order_date",
                    "start": YEAR[0].isoformat()}],
    }))  # fmt: skip
    config = load_config(cfg_path)
    defs = build_definitions(config)
    repo = defs.get_repository_def()
    sensor = next(s for s in defs.sensors or [] if s.name.endswith("__late_data"))
    asset_def = next(iter(defs.assets or []))
    checks = day_checks_for(config, config.tables[0], asset_def.key)  # type: ignore[union-attr]
    last = YEAR[-1]
    first = last - dt.timedelta(days=window - 1)
    tm, manifests = median_time(lambda: read_manifests(sink, checks, first, last), runs)
    ta, _ = median_time(lambda: read_manifests(adls, checks, first, last), runs)
    with connect(conninfo) as conn:
        tq, _ = median_time(lambda: find_changes(conn, checks, manifests, first, last), runs)  # type: ignore[arg-type]
    print(f"window {window:3d} days: read manifests local {tm:6.3f} s, loopback ADLS "
          f"{ta:6.3f} s; grouped recount + compare {tq:6.3f} s")  # fmt: skip
    with DagsterInstance.ephemeral() as instance:

        def tick() -> Any:
            with build_sensor_context(
                instance=instance, repository_def=repo, sensor_name=sensor.name,
                resources=dict(repo.get_top_level_resources()),
            ) as ctx:  # fmt: skip
                return sensor.evaluate_tick(ctx)

        tt, data = median_time(tick, runs)
    print(f"window {window:3d} days: whole tick as the daemon runs it {tt:6.3f} s "
          f"({len(data.asset_events)} changes found)")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--year-rows", type=int, default=5_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["read", "sensor"])
    args = ap.parse_args()
    conninfo = os.environ.get("PG_ASSETS_CONNINFO")
    if not conninfo:
        from pg_assets.dev.embedded import start

        conninfo = start(ROOT / ".pg_assets").conninfo
        os.environ["PG_ASSETS_CONNINFO"] = conninfo
    from pg_assets_tests.adls_server import AdlsTestServer

    os.environ["BENCH_ADLS_KEY"] = ACCOUNT_KEY
    prepare(conninfo, args.rows, args.year_rows)
    adls = AdlsTestServer().start()
    try:
        if args.only in (None, "read"):
            bench_read_back(conninfo, args.rows, args.runs, adls.url)
        if args.only in (None, "sensor"):
            bench_sensor(conninfo, args.year_rows, args.runs, adls.url)
    finally:
        adls.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

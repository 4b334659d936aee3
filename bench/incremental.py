"""Incremental tables: what a batch costs against the bare COPY of the same rows, and what a
sensor tick costs on a big table with an index on the cursor. Prints figures, asserts nothing.

    .venv/bin/python -m bench.incremental [--base 2000000] [--changed 1000000]
                                          [--big 10000000] [--runs 3] [--ticks 20]

1. `bench_inc.payments` (`--base` rows, ~150 bytes of CSV each, an index on `updated_at`):
   batch 0 (the full snapshot), then `--changed` rows are updated (`updated_at = now()`) and
   batch 1 takes them. Batch 1 is measured `--runs` times (its manifest and data file are
   removed before each rerun, which rewrites the same batch), interleaved with
   `psql -c "COPY (<the batch's own SELECT>) TO STDOUT (FORMAT csv, HEADER)" > /dev/null`
   (what the server needs to produce those rows) and `psql … | gzip -1 > file`.
2. `bench_inc.big` (`--big` rows, kept between runs): batch 0 once, then `--ticks` ticks of
   the real sensor evaluated as the daemon does, plus the poll's statements alone and their
   plans; for comparison, the same max() with the index dropped (inside a rolled-back
   transaction).

Starts the embedded PostgreSQL (or uses $PG_ASSETS_CONNINFO), like `bench.run`.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import yaml

from pg_assets.core.compression import get_codec
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.incremental import (
    MARGIN_S,
    BatchResult,
    IncrementalSpec,
    extract_batch,
    poll,
    read_cap,
)
from pg_assets.core.session import connect_kwargs
from pg_assets.sensors.incremental import _connect, in_flight_run, lake_state
from pg_assets.sinks.local import LocalSink

ROOT = Path(__file__).resolve().parent.parent

PAYMENTS = """
DROP TABLE IF EXISTS bench_inc.payments;
CREATE TABLE bench_inc.payments (
    id bigint PRIMARY KEY, customer_id int NOT NULL, amount numeric(12,2) NOT NULL,
    status text NOT NULL, note text, attrs jsonb, updated_at timestamptz NOT NULL
);
INSERT INTO bench_inc.payments
SELECT g, 1 + g % 99991, round((g % 100000)::numeric / 100, 2),
       (ARRAY['new','paid','refunded'])[1 + g % 3],
       CASE g % 4 WHEN 0 THEN NULL WHEN 1 THEN 'card, 3-D "secure"' WHEN 2 THEN E'split\\npay'
                  ELSE 'Überweisung ' || g END,
       jsonb_build_object('channel', (ARRAY['web','app','pos'])[1 + g % 3], 'n', g % 97),
       now() - interval '2 days' + g * interval '1 millisecond'
FROM generate_series(1, {rows}) g;
CREATE INDEX ON bench_inc.payments (updated_at);
"""

BIG = """
DROP TABLE IF EXISTS bench_inc.big;
CREATE TABLE bench_inc.big (id bigint NOT NULL, updated_at timestamptz NOT NULL, payload text);
INSERT INTO bench_inc.big
SELECT g, timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second', 'row ' || g
FROM generate_series(1, {rows}) g;
CREATE INDEX ON bench_inc.big (updated_at);
"""


def connect(conninfo: str, *, autocommit: bool = False) -> psycopg.Connection:
    kwargs = connect_kwargs(10, 0, conninfo)
    conn = psycopg.connect(conninfo, **kwargs, autocommit=autocommit)  # type: ignore[arg-type]
    if not autocommit:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
    return conn


def batch(
    conninfo: str, spec: IncrementalSpec, sink: LocalSink, codec: str = "gzip"
) -> tuple[BatchResult, float]:
    c = get_codec(codec)
    with connect(conninfo) as conn:
        started = time.perf_counter()
        result = extract_batch(
            conn, spec=spec, sink=sink, codec=c, level=c.default_level if codec != "gzip" else 1,
            run_id="bench",
        )  # fmt: skip
        seconds = time.perf_counter() - started
    assert isinstance(result, BatchResult), result
    return result, seconds


def shell(command: str) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)
    return time.perf_counter() - started


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_batch(conninfo: str, psql: str, args: argparse.Namespace, work: Path) -> None:
    print(f"\n== a batch of {args.changed:,} changed rows (table of {args.base:,}) ==")
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute("CREATE SCHEMA IF NOT EXISTS bench_inc")
        t = time.perf_counter()
        c.execute(PAYMENTS.format(rows=int(args.base)))  # type: ignore[arg-type]
        c.execute("VACUUM ANALYZE bench_inc.payments")
        print(f"loaded in {time.perf_counter() - t:.1f} s")
    spec = IncrementalSpec("bench", QualifiedName("bench_inc", "payments"), "updated_at", ("id",))
    sink = LocalSink(work / "bronze")
    b0, s0 = batch(conninfo, spec, sink)
    print(
        f"batch 0 (full snapshot): {b0.stats.rows:,} rows, {b0.stats.raw_bytes / 1e6:.0f} MB "
        f"raw, {s0:.2f} s ({b0.stats.raw_bytes / 1e6 / s0:.0f} MB/s)"
    )
    with psycopg.connect(conninfo, autocommit=True) as c:
        t = time.perf_counter()
        c.execute(
            "UPDATE bench_inc.payments SET status = 'paid', updated_at = now() WHERE id %% %s = 0",
            (max(1, args.base // args.changed),),
        )
        c.execute("VACUUM ANALYZE bench_inc.payments")
        print(f"updated in {time.perf_counter() - t:.1f} s")
    time.sleep(MARGIN_S + 0.5)
    paths = spec.paths
    core, plain, bare, gz, outside = [], [], [], [], []
    result: BatchResult | None = None

    def rerun(codec: str) -> tuple[BatchResult, float]:
        for ext in (".gz", ""):
            sink.delete(paths.data(1, 0, ext))
        sink.delete(paths.manifest(1))
        return batch(conninfo, spec, sink, codec)

    for round_ in range(args.runs):
        result, seconds = rerun("gzip")
        core.append(seconds)
        outside.append(seconds - result.stats.seconds)
        plain.append(rerun("none")[1])
        select = result.manifest["select"]
        copy = f"COPY ({select}) TO STDOUT (FORMAT csv, HEADER)"
        bare.append(shell(f"{psql} -X -q -d '{conninfo}' -c {json.dumps(copy)} > /dev/null"))
        gz.append(
            shell(
                f"{psql} -X -q -d '{conninfo}' -c {json.dumps(copy)} | gzip -1 > {work / 'out.gz'}"
            )
        )
        print(f"  round {round_ + 1}: core {core[-1]:.2f} s (uncompressed {plain[-1]:.2f} s), "
              f"psql {bare[-1]:.2f} s, psql|gzip -1 {gz[-1]:.2f} s")  # fmt: skip
    assert result is not None
    s = result.stats
    raw_mb = s.raw_bytes / 1e6
    print(f"batch 1: {s.rows:,} rows, {raw_mb:.0f} MB raw, {s.compressed_bytes / 1e6:.0f} MB gz")
    print(f"  {'method':<40} {'median s':>9} {'MB/s':>7} {'× psql':>7}")
    for name, xs in [
        ("psql COPY (same SELECT) > /dev/null", bare),
        ("psql COPY | gzip -1 > file", gz),
        ("core batch, codec none", plain),
        ("core batch, gzip 1 (the default)", core),
    ]:
        m = median(xs)
        print(f"  {name:<40} {m:>9.2f} {raw_mb / m:>7.0f} {m / median(bare):>7.2f}")
    print(
        f"  of the core batch, {median(outside):.3f} s is outside the COPY stream (lock, lake "
        "lookup, cap, bounds, publish, manifest)"
    )


def bench_ticks(conninfo: str, args: argparse.Namespace, work: Path) -> None:
    print(f"\n== the sensor's tick on {args.big:,} rows, index on the cursor ==")
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute("CREATE SCHEMA IF NOT EXISTS bench_inc")
        have = c.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass('bench_inc.big')"
        ).fetchone()
        if not have or abs(have[0] - args.big) > args.big // 100:
            t = time.perf_counter()
            c.execute(BIG.format(rows=int(args.big)))  # type: ignore[arg-type]
            c.execute("VACUUM ANALYZE bench_inc.big")
            print(f"loaded in {time.perf_counter() - t:.1f} s")
        (size,) = c.execute("SELECT pg_size_pretty(pg_table_size('bench_inc.big'))").fetchone()  # type: ignore[misc]
    config = {
        "source": "bench",
        "postgres": {"conninfo_env": "PG_ASSETS_CONNINFO"},
        "bronze": {"root": str(work / "bronze"), "codec": "gzip", "level": 1},
        "tables": [
            {"table": "bench_inc.big", "mode": "incremental", "cursor": "updated_at",
             "key": ["id"]}
        ],
    }  # fmt: skip
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    os.environ["PG_ASSETS_CONNINFO"] = conninfo
    from dagster import DagsterInstance, build_sensor_context

    from pg_assets.build import build_definitions
    from pg_assets.config import load_config

    defs = build_definitions(load_config(work / "config.yaml"))
    sensor = list(defs.sensors or [])[0]
    resources = {
        k: v
        for k, v in defs.get_repository_def().get_top_level_resources().items()
        if k in sensor.required_resource_keys
    }
    spec = IncrementalSpec("bench", QualifiedName("bench_inc", "big"), "updated_at", ("id",))
    b0, s0 = batch(conninfo, spec, LocalSink(work / "bronze"))
    print(f"table {size}; batch 0: {b0.stats.rows:,} rows in {s0:.1f} s")
    with tempfile.TemporaryDirectory() as home, DagsterInstance.local_temp(home) as instance:

        def tick(cursor: str | None):
            with build_sensor_context(
                instance=instance, cursor=cursor, definitions=defs, resources=resources
            ) as context:
                started = time.perf_counter()
                data = sensor.evaluate_tick(context)
                return data, time.perf_counter() - started

        data, first = tick(None)  # no cursor: finds the newest manifest by listing
        cursor, times = data.cursor, []
        for _ in range(args.ticks):
            data, seconds = tick(cursor)
            cursor = data.cursor
            times.append(seconds)
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute("INSERT INTO bench_inc.big VALUES (0, now() - interval '5 s', 'new')")
        changed, changed_s = tick(cursor)
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute("DELETE FROM bench_inc.big WHERE id = 0")
        parts: dict[str, list[float]] = {"in-flight check": [], "lake (2 stats)": [],
                                         "connect": []}  # fmt: skip
        from pg_assets.build import build_resources

        built = build_resources(load_config(work / "config.yaml"))
        postgres, bronze = built["postgres"], built["bronze"]
        key = list(defs.assets or [])[0].key  # type: ignore[union-attr]
        cached = json.loads(cursor or "{}")
        for _ in range(args.ticks):
            t = time.perf_counter()
            in_flight_run(instance, key, "bench/bench_inc.big")
            parts["in-flight check"].append(time.perf_counter() - t)
            t = time.perf_counter()
            lake_state(bronze.get_sink(), spec.paths, cached)
            parts["lake (2 stats)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with _connect(postgres):
                pass
            parts["connect"].append(time.perf_counter() - t)
    times.sort()
    print(f"  ticks (nothing new): median {median(times) * 1000:.1f} ms, "
          f"p90 {times[int(len(times) * 0.9) - 1] * 1000:.1f} ms over {len(times)}; "
          f"first tick without a cursor {first * 1000:.1f} ms")  # fmt: skip
    print(f"  tick with a new row: {changed_s * 1000:.1f} ms -> {len(changed.run_requests)} run "
          "request")  # fmt: skip
    print(
        "  parts of a tick: "
        + ", ".join(f"{k} {median(v) * 1000:.1f} ms" for k, v in parts.items())
    )
    high = b0.manifest["watermark"]["high"]
    with connect(conninfo, autocommit=True) as c:
        polls, caps = [], []
        for _ in range(args.ticks):
            t = time.perf_counter()
            read_cap(c, "timestamptz")
            caps.append(time.perf_counter() - t)
            t = time.perf_counter()
            poll(c, table=spec.table, cursor="updated_at", kind="timestamptz", after=high)
            polls.append(time.perf_counter() - t)
        plan = c.execute(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) "
            "SELECT max(updated_at) FROM bench_inc.big WHERE updated_at <= now()"
        ).fetchall()
        print(f"  of which: the cap query {median(caps) * 1000:.2f} ms, the whole poll (cap + "
              f"two max() probes) {median(polls) * 1000:.2f} ms")  # fmt: skip
        print("  plan of the capped max():")
        for (line,) in plan:
            print(f"    {line}")
        c.execute("BEGIN")
        c.execute("DROP INDEX bench_inc.big_updated_at_idx")
        t = time.perf_counter()
        c.execute("SELECT max(updated_at) FROM bench_inc.big WHERE updated_at <= now()")
        scan = time.perf_counter() - t
        c.execute("ROLLBACK")
    print(f"  the same max() without the index (a scan of the table): {scan * 1000:.0f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=int, default=2_000_000)
    ap.add_argument("--changed", type=int, default=1_000_000)
    ap.add_argument("--big", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ticks", type=int, default=20)
    ap.add_argument("--only", choices=["batch", "ticks"])
    args = ap.parse_args()
    conninfo = os.environ.get("PG_ASSETS_CONNINFO")
    if not conninfo:
        from pg_assets.dev.embedded import start

        conninfo = start(ROOT / ".pg_assets").conninfo
    from pg_assets.dev.embedded import PG_BIN

    work = Path(tempfile.mkdtemp(prefix="pg_assets_bench_inc_"))
    try:
        if args.only != "ticks":
            bench_batch(conninfo, str(PG_BIN / "psql"), args, work)
        if args.only != "batch":
            shutil.rmtree(work / "bronze", ignore_errors=True)
            bench_ticks(conninfo, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

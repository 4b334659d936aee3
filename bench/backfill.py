"""A year's backfill through the Dagster daemon, as a user launches it from the UI.

    .venv/bin/python -m bench.backfill [--days 365] [--rows-per-day 1000] [--per-run 1,30,92]

Builds a daily-partitioned table (one child per day, ~`--rows-per-day` rows a day with
realistic variation: weekly cycle, noise, Black Friday), then for each `max_partitions_per_run`
value starts a real `dagster-webserver` and `dagster-daemon run` on a fresh DAGSTER_HOME with
the project's dagster.yaml, launches a backfill of every day through GraphQL
`launchPartitionBackfill` (the mutation the UI's "Launch backfill" sends) and waits until every
day is materialized. Reports wall time from the launch to the last day's materialization,
runs launched, seconds per day, the ratio to one bare `psql COPY` of the same rows, the number
of distinct per-day row counts visible through GraphQL, and where each run's seconds went
(from the event log: queue, process start + code load, step, teardown).

`--code-dir DIR` runs another checkout's code (e.g. main before this change) with the same
harness: its package is put first on PYTHONPATH and its dagster.yaml and workspace.yaml are
used; per-run values are then not written to its config (it has no such setting).
"""

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from pg_assets_tests.dagster_dev import graphql, launch_backfill  # the same calls the UI makes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SOURCE = "bench"
SCHEMA, TABLE = "bench", "year"
COPY_ALL = "COPY (SELECT * FROM bench.year) TO STDOUT (FORMAT csv, HEADER)"
FIRST_DAY = dt.date(2025, 1, 1)


@dataclass
class Measurement:
    label: str
    per_run: int | None
    days: int
    wall_s: float = 0.0
    runs: int = 0
    materialized: int = 0
    failed: int = 0
    distinct_row_counts: int = 0
    pickup_s: float = 0.0  # launch → first run created (the backfill daemon's loop, ≤ 30 s)
    submit_s: float = 0.0  # first → last run created (the daemon creates them one by one)
    stages: dict[str, float] = field(default_factory=dict)  # medians per run
    error: str = ""

    @property
    def s_per_day(self) -> float:
        return self.wall_s / self.days if self.days else 0.0


def build_table(conninfo: str, days: int, rows_per_day: int) -> tuple[int, list[dt.date]]:
    from pg_assets.dev.demo_data import create_daily_partitioned, daily_volumes

    all_days = [FIRST_DAY + dt.timedelta(days=n) for n in range(days)]
    volumes = daily_volumes(all_days, rows_per_day, "bench")
    with psycopg.connect(conninfo, autocommit=True) as c:
        marker = f"bench {days} days {rows_per_day} rows"
        row = c.execute(
            "SELECT obj_description(to_regclass(%s), 'pg_class')", (f"{SCHEMA}.{TABLE}",)
        ).fetchone()
        if not row or row[0] != marker:
            print(f"building {SCHEMA}.{TABLE}: {days} days, ~{rows_per_day} rows a day ...")
            with c.transaction():
                create_daily_partitioned(c, SCHEMA, TABLE, all_days, volumes)
                c.execute(
                    sql.SQL("COMMENT ON TABLE {} IS {}").format(
                        sql.Identifier(SCHEMA, TABLE), sql.Literal(marker)
                    )
                )
            c.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(SCHEMA, TABLE)))
    return sum(volumes.values()), all_days


def psql_copy_seconds(conninfo: str, runs: int = 3) -> float:
    """One bare COPY of every row of the table, to /dev/null: what PostgreSQL alone costs."""
    from pg_assets.dev.embedded import PG_BIN

    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(
            [str(PG_BIN / "psql"), conninfo, "-X", "-q", "-c",
             COPY_ALL],
            check=True, stdout=subprocess.DEVNULL, timeout=600,
        )  # fmt: skip
        times.append(time.perf_counter() - t)
    return statistics.median(times)


STATS = """
query ($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode { partitionStats { numMaterialized numFailed numMaterializing } }
  }
}"""

ROW_COUNTS = """
query ($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    ... on Asset { assetMaterializations {
        partition metadataEntries { label ... on IntMetadataEntry { intValue } } } }
  }
}"""


def wait_done(url: str, key: list[str], days: int, timeout_s: float, services) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    stats: dict[str, int] = {}
    while time.monotonic() < deadline:
        services.check_alive()
        node = graphql(url, STATS, key={"path": key})["assetNodeOrError"]
        stats = node.get("partitionStats") or {}
        done = stats.get("numMaterialized", 0) + stats.get("numFailed", 0)
        if done >= days and not stats.get("numMaterializing"):
            return stats
        time.sleep(0.5)
    return stats


def per_day_row_counts(url: str, key: list[str]) -> dict[str, int]:
    mats = graphql(url, ROW_COUNTS, key={"path": key})["assetOrError"]["assetMaterializations"]
    out: dict[str, int] = {}
    for m in mats:
        for e in m["metadataEntries"]:
            if e["label"] == "dagster/partition_row_count":
                out.setdefault(m["partition"], e["intValue"])
    return out


STAGES = [
    ("queued", "RUN_ENQUEUED", "RUN_STARTING"),
    ("process+load", "RUN_STARTING", "RUN_START"),
    ("to step", "RUN_START", "STEP_START"),
    ("step", "STEP_START", ("STEP_SUCCESS", "STEP_FAILURE")),
    ("teardown", ("STEP_SUCCESS", "STEP_FAILURE"), ("RUN_SUCCESS", "RUN_FAILURE")),
]


def event_log_breakdown(home: Path, backfill_id: str, t_launch: float, m: Measurement) -> None:
    """Where each run's seconds went, from the instance's own event log."""
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.storage.dagster_run import RunsFilter

    cwd = os.getcwd()
    os.chdir(home)  # main's dagster.yaml has storage paths relative to the working directory
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            records = instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill_id}))
            m.runs = len(records)
            if not records:
                return
            created = sorted(r.create_timestamp.timestamp() for r in records)
            m.pickup_s = created[0] - t_launch
            m.submit_s = created[-1] - created[0]
            per_stage: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
            last_mat = 0.0
            for rec in records:
                times: dict[str, float] = {}
                for ev in instance.get_records_for_run(
                    rec.dagster_run.run_id, limit=100_000
                ).records:
                    e = ev.event_log_entry
                    if e.dagster_event is None:
                        continue
                    t = e.dagster_event.event_type.name  # the value of RUN_* is PIPELINE_*
                    times.setdefault(t, e.timestamp)
                    if t == DagsterEventType.ASSET_MATERIALIZATION.name:
                        last_mat = max(last_mat, e.timestamp)
                times.setdefault("RUN_ENQUEUED", rec.create_timestamp.timestamp())
                for name, a, b in STAGES:
                    ta = next((times[x] for x in _tuple(a) if x in times), None)
                    tb = next((times[x] for x in _tuple(b) if x in times), None)
                    if ta is not None and tb is not None:
                        per_stage[name].append(tb - ta)
            m.stages = {k: round(statistics.median(v), 2) for k, v in per_stage.items() if v}
            if last_mat:
                m.wall_s = last_mat - t_launch
    finally:
        os.chdir(cwd)


def _tuple(x: str | tuple[str, ...]) -> tuple[str, ...]:
    return (x,) if isinstance(x, str) else x


def measure(
    *,
    conninfo: str,
    code_dir: Path,
    per_run: int | None,
    label: str,
    partitions: list[str],
    start: dt.date,
    timeout_s: float,
    port: int,
    keep: bool,
    max_runs: int | None = None,
    checks: bool = True,
) -> Measurement:
    from pg_assets.dev.services import DagsterServices

    m = Measurement(label, per_run, len(partitions))
    home = Path(tempfile.mkdtemp(prefix="bench_backfill_"))
    instance = yaml.safe_load((code_dir / "dagster.yaml").read_text())
    if max_runs is not None:
        instance.setdefault("concurrency", {}).setdefault("runs", {})["max_concurrent_runs"] = (
            max_runs
        )
        m.label += f", {max_runs} runs at once"
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance, sort_keys=False))
    config: dict[str, Any] = {
        "source": SOURCE,
        "postgres": {"conninfo_env": "PG_ASSETS_CONNINFO", "pool_max": 2},
        "bronze": {"root": str(home / "bronze"), "codec": "gzip", "level": 1},
        "tables": [
            {"table": f"{SCHEMA}.{TABLE}", "partition_column": "order_date", "start": str(start)}
        ],
    }
    if per_run is not None:
        config["backfill"] = {"max_partitions_per_run": per_run}
    if not checks:
        config["checks"] = {"enabled": False}
        m.label += ", checks off"
    (home / "pg_assets.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {
        "PG_ASSETS_CONNINFO": conninfo,
        "PG_ASSETS_CONFIG": str(home / "pg_assets.yaml"),
        "PYTHONPATH": str(code_dir),
    }
    services = DagsterServices(
        cwd=home,
        dagster_home=home,
        workspace=code_dir / "workspace.yaml",
        port=port,
        env=env,
        log_dir=home / "logs_bench",
    )
    key = [SOURCE, SCHEMA, TABLE]
    try:
        # both running before the launch, as for a user clicking "Launch backfill"
        services.start_webserver().start_daemon().wait_ready(180)
        t_launch = time.time()
        backfill_id = launch_backfill(services.url, key, partitions)
        stats = wait_done(services.url, key, len(partitions), timeout_s, services)
        m.materialized = stats.get("numMaterialized", 0)
        m.failed = stats.get("numFailed", 0)
        if m.materialized + m.failed < len(partitions):
            m.error = f"timed out after {timeout_s:.0f} s: {stats}"
        counts = per_day_row_counts(services.url, key)
        m.distinct_row_counts = len(set(counts.values()))
        event_log_breakdown(home, backfill_id, t_launch, m)
    except Exception as e:  # report what happened and go on with the next configuration
        m.error = f"{type(e).__name__}: {e}"
    finally:
        services.stop()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"  kept {home}")
    return m


def build_many_tables(conninfo: str, n: int, children: int) -> None:
    """`n` small tables, each RANGE-partitioned by day with `children` daily children."""
    with psycopg.connect(conninfo, autocommit=True) as c:
        marker = f"load bench {n} tables {children} children"
        row = c.execute("SELECT obj_description(to_regnamespace('loadbench'), 'pg_namespace')")
        if (got := row.fetchone()) and got[0] == marker:
            return
        print(f"building {n} tables × {children} children in schema loadbench ...")
        with c.transaction():
            c.execute("DROP SCHEMA IF EXISTS loadbench CASCADE")
            c.execute("CREATE SCHEMA loadbench")
            for i in range(n):
                t = sql.Identifier("loadbench", f"t{i:03d}")
                c.execute(
                    sql.SQL("CREATE TABLE {} (id int, d date) PARTITION BY RANGE (d)").format(t)
                )
                for k in range(children):
                    day = FIRST_DAY + dt.timedelta(days=k)
                    c.execute(
                        sql.SQL(
                            "CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})"
                        ).format(
                            sql.Identifier("loadbench", f"t{i:03d}_{k}"),
                            t,
                            sql.Literal(day),
                            sql.Literal(day + dt.timedelta(days=1)),
                        )
                    )
            c.execute(sql.SQL("COMMENT ON SCHEMA loadbench IS {}").format(sql.Literal(marker)))


def load_seconds(code_dir: Path, config: Path, conninfo: str, runs: int) -> dict[str, float]:
    """Median wall seconds of a fresh interpreter importing dagster alone, and importing the
    code location (`pg_assets.definitions`) with the given config: the difference is ours."""
    env = {
        **os.environ,
        "PYTHONPATH": str(code_dir),
        "PG_ASSETS_CONFIG": str(config),
        "PG_ASSETS_CONNINFO": conninfo,
    }
    out = {}
    for name, code in (
        ("import dagster", "import dagster"),
        (
            "import pg_assets.definitions",
            f"import pg_assets.definitions, sys; assert pg_assets.__file__.startswith("
            f"{str(code_dir)!r}), pg_assets.__file__",
        ),
    ):
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            # cwd: the config's folder, so `-c`'s sys.path[0] cannot shadow PYTHONPATH
            subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300,
                           cwd=config.parent, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def markdown(rows: list[Measurement], copy_s: float, total_rows: int, args) -> str:
    out = [
        f"Year backfill: {args.days} days, {total_rows:,} rows (~{args.rows_per_day:,}/day), "
        f"one bare `psql COPY` of all rows: {copy_s:.2f} s.",
        "",
        "| code | max_partitions_per_run | runs | wall s | s/day | × psql COPY | materialized "
        "| failed | distinct row counts | daemon pickup s | runs created over s "
        "| median run: queued / process+load / to step / step / teardown s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in rows:
        st = " / ".join(
            f"{m.stages.get(k, float('nan')):.2f}" for k in ("queued", "process+load", "to step")
        )
        st += f" / {m.stages.get('step', float('nan')):.2f} / {m.stages.get('teardown', float('nan')):.2f}"
        out.append(
            f"| {m.label} | {m.per_run if m.per_run is not None else '1 (no policy)'} | {m.runs} "
            f"| {m.wall_s:.1f} | {m.s_per_day:.3f} | {m.wall_s / copy_s:.0f} | {m.materialized} "
            f"| {m.failed} | {m.distinct_row_counts} | {m.pickup_s:.1f} | {m.submit_s:.1f} | {st} |"
            + (f" {m.error}" if m.error else "")
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backfill", description=__doc__)
    p.add_argument("--days", type=int, default=365, help="days in the table and the backfill")
    p.add_argument("--rows-per-day", type=int, default=1000, help="mean rows a day (try 100000)")
    p.add_argument(
        "--per-run",
        default="1,30,92",
        help="comma-separated max_partitions_per_run values to measure",
    )
    p.add_argument("--code-dir", type=Path, help="measure another checkout (e.g. main) instead")
    p.add_argument("--label", help="name of the code measured (default: this checkout / DIR)")
    p.add_argument("--timeout", type=float, default=5400, help="seconds allowed per backfill")
    p.add_argument("--port", type=int, default=3117)
    p.add_argument("--no-checks", action="store_true", help="checks.enabled: false in the config")
    p.add_argument(
        "--max-concurrent-runs", type=int, help="override dagster.yaml's concurrency.runs limit"
    )
    p.add_argument("--keep", action="store_true", help="keep each DAGSTER_HOME for inspection")
    p.add_argument(
        "--load-tables",
        type=int,
        help="instead: time loading the code location with this many tables (10 days each)",
    )
    args = p.parse_args(argv)

    conninfo = os.environ.get("PG_ASSETS_CONNINFO")
    if not conninfo:
        from pg_assets.dev.embedded import start

        conninfo = start(ROOT / ".pg_assets").conninfo
    if args.load_tables:
        build_many_tables(conninfo, args.load_tables, 10)
        code_dir = (args.code_dir or ROOT).resolve()
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "many.yaml"
            tables = [
                {"table": f"loadbench.t{i:03d}", "partition_column": "d", "start": str(FIRST_DAY)}
                for i in range(args.load_tables)
            ]
            doc = {"source": "load", "bronze": {"root": f"{tmp}/bronze"}, "tables": tables}
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
            times = load_seconds(code_dir, config, conninfo, runs=5)
        ours = times["import pg_assets.definitions"] - times["import dagster"]
        print(
            f"{args.label or code_dir}: {args.load_tables} tables: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
            + f"; beyond Dagster's own import: {ours:.2f} s"
        )
        return 0
    total_rows, days = build_table(conninfo, args.days, args.rows_per_day)
    partitions = [d.isoformat() for d in days]
    copy_s = psql_copy_seconds(conninfo)
    print(f"{total_rows:,} rows; psql COPY of all of them: {copy_s:.2f} s")

    code_dir = (args.code_dir or ROOT).resolve()
    label = args.label or ("this checkout" if args.code_dir is None else str(code_dir))
    values: list[int | None] = (
        [None] if args.code_dir else [int(v) for v in args.per_run.split(",") if v]
    )
    rows = []
    for per_run in values:
        print(f"backfill of {len(partitions)} days, {label}, max_partitions_per_run={per_run} ...")
        m = measure(
            conninfo=conninfo,
            code_dir=code_dir,
            per_run=per_run,
            label=label,
            partitions=partitions,
            start=days[0],
            timeout_s=args.timeout,
            port=args.port,
            keep=args.keep,
            max_runs=args.max_concurrent_runs,
            checks=not args.no_checks,
        )
        print(
            f"  {m.wall_s:.1f} s wall, {m.runs} runs, {m.materialized} materialized, "
            f"{m.failed} failed, {m.distinct_row_counts} distinct row counts, stages {m.stages}"
            + (f"  ERROR {m.error}" if m.error else ""),
            flush=True,
        )
        rows.append(m)

    RESULTS.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, copy_s, total_rows, args)
    print("\n" + md)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    (RESULTS / f"backfill-{stamp}.md").write_text(md)
    (RESULTS / f"backfill-{stamp}.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "rows": total_rows,
                "psql_copy_s": copy_s,
                "measurements": [asdict(m) | {"s_per_day": m.s_per_day} for m in rows],
            },
            indent=2,
        )
    )
    return 0 if all(not m.error for m in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

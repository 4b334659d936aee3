"""`pg-assets`: the embedded quick start and a few operator commands.

    pg-assets demo [--start D] [--end D]   start PostgreSQL, load demo data, materialize days
    pg-assets dev                          the same server, then `dagster dev` (the UI)
    pg-assets up | stop                    start / stop the embedded PostgreSQL
    pg-assets check                        validate the config against the live catalog
    pg-assets writer                       keep writing to the demo's incremental table
    pg-assets cdc setup|drop|status        change data capture (see the README)

Commands run from the project folder: state lives in ./.pg_assets, the Dagster instance is
./dagster.yaml. With PG_ASSETS_CONNINFO already set, the embedded server is not used.
"""

import argparse
import datetime as dt
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", module="platformdirs")

DEMO_END = dt.date(2026, 11, 4)
DEMO_DAYS = 35


def _home() -> Path:
    return Path.cwd() / ".pg_assets"


def _up(reload: bool = False) -> str:
    """Ensure a database: the user's (PG_ASSETS_CONNINFO) or the embedded one with demo data."""
    if os.environ.get("PG_ASSETS_CONNINFO"):
        return os.environ["PG_ASSETS_CONNINFO"]
    import psycopg

    from pg_assets.dev.demo_data import load_demo
    from pg_assets.dev.embedded import start

    server = start(_home())
    with psycopg.connect(server.conninfo, autocommit=True) as conn:
        loaded = conn.execute(
            "SELECT to_regclass('public.customers') IS NOT NULL"
            " AND to_regclass('public.inventory') IS NOT NULL"
            " AND to_regclass('public.payments') IS NOT NULL"
        ).fetchone()
        if reload or not (loaded and loaded[0]):
            print(f"loading demo tables ({DEMO_DAYS} days up to {DEMO_END}) ...", flush=True)
            with conn.transaction():
                load_demo(conn, DEMO_END, DEMO_DAYS)
    os.environ["PG_ASSETS_CONNINFO"] = server.conninfo
    print(f"PostgreSQL ready: {server.conninfo}  (psql: {server.psql})", flush=True)
    return server.conninfo


def _dagster_env() -> None:
    os.environ.setdefault("DAGSTER_HOME", str(Path.cwd()))
    (Path.cwd() / ".pg_assets" / "dagster").mkdir(parents=True, exist_ok=True)


def cmd_demo(args: argparse.Namespace) -> int:
    _up(args.reload)
    _dagster_env()
    from dagster import DagsterInstance

    from pg_assets.build import build_definitions
    from pg_assets.config import load_config

    config = load_config()
    defs = build_definitions(config)
    instance = DagsterInstance.get()
    end = args.end or DEMO_END
    start = args.start or end - dt.timedelta(days=6)
    days = [start + dt.timedelta(days=n) for n in range((end - start).days + 1)]
    print(
        f"materializing {len(days)} days × {len(defs.schedules or [])} tables into {config.bronze.root}"
    )
    print(
        f"{'asset':<28} {'day':<11} {'rows':>8} {'raw MB':>8} {'gz MB':>7} {'ratio':>6} {'MB/s':>7}  relation"
    )
    failed = 0
    for schedule in defs.schedules or []:
        job = defs.resolve_job_def(schedule.job_name)
        for day in days:
            result = job.execute_in_process(
                partition_key=day.isoformat(),
                instance=instance,
                raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            )
            if not result.success:
                failed += 1
                print(f"FAILED {schedule.job_name} {day}: see the run in the UI")
                continue
            for mat in result.get_asset_materialization_events():
                m = mat.materialization.metadata
                print(
                    f"{mat.asset_key.to_user_string():<28} {day.isoformat():<11} "
                    f"{m['rows'].value:>8} {m['raw_bytes'].value / 1e6:>8.2f} "
                    f"{m['compressed_bytes'].value / 1e6:>7.2f} {m['compression_ratio'].value:>6.1f} "
                    f"{m['mb_per_s'].value:>7.1f}  {m['source_relation'].value} ({m['strategy'].value})"
                )
    from pg_assets.dev.writer import demo_batches

    failed += demo_batches(config, defs, instance)
    from pg_assets.dev.cdc_cli import demo_cdc

    failed += demo_cdc(config, defs, instance)
    print(f"\nBronze: {config.bronze.root}\nOpen the UI with: .venv/bin/pg-assets dev")
    return 1 if failed else 0


def cmd_dev(args: argparse.Namespace) -> int:
    _up(args.reload)
    _dagster_env()
    cmd = [str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml"]
    cmd += ["-h", args.host, "-p", str(args.port)]
    os.execv(cmd[0], cmd)


def cmd_up(args: argparse.Namespace) -> int:
    _up(args.reload)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from pg_assets.dev.embedded import EmbeddedPostgres, running_port

    pgdata = _home() / "pgdata"
    port = running_port(pgdata)
    if port is None:
        print("embedded PostgreSQL is not running")
        return 0
    EmbeddedPostgres(pgdata, port).stop()
    print("stopped")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from pg_assets.catalog import resolve_tables
    from pg_assets.config import ConfigError, load_config

    try:
        config = load_config()
        for r in resolve_tables(config):
            state = "checked" if r.info else "NOT CHECKED (database unreachable)"
            print(f"{r.config.table}: first day {r.start}, {state}")
        from pg_assets.assets.incremental import check_incremental

        for line in check_incremental(config):
            print(line)
        from pg_assets.dev.cdc_cli import check_lines

        problems = check_lines(config)
        for t in config.tables_of("cdc"):
            print(f"{t.table}: cdc, {'NOT READY' if problems else 'ready'}")
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        if problems:
            return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_writer(args: argparse.Namespace) -> int:
    from pg_assets.dev.writer import run_writer

    conninfo = _up()
    print("writing to public.payments; Ctrl-C to stop", flush=True)
    run_writer(conninfo, rate=args.rate, updates=args.updates, seconds=args.seconds,
               long_every=args.long_every, long_s=args.long_s)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pg-assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in [
        ("demo", cmd_demo),
        ("dev", cmd_dev),
        ("up", cmd_up),
        ("stop", cmd_stop),
        ("check", cmd_check),
        ("writer", cmd_writer),
    ]:
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        if name in ("demo", "dev", "up"):
            p.add_argument("--reload", action="store_true", help="recreate the demo tables")
        if name == "demo":
            p.add_argument("--start", type=dt.date.fromisoformat, help="first day (YYYY-MM-DD)")
            p.add_argument("--end", type=dt.date.fromisoformat, help="last day (YYYY-MM-DD)")
        if name == "writer":
            from pg_assets.dev.writer import add_arguments

            add_arguments(p)
        if name == "dev":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=3000)
    from pg_assets.dev.cdc_cli import add_parser

    add_parser(sub)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

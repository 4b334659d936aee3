"""`pg-assets`: the embedded quick start and a few operator commands.

Commands run from the project folder: PostgreSQL's data, Bronze and the Dagster instance
(DAGSTER_HOME, unless set) live in ./.pg_assets; ./dagster.yaml is the instance config. With
PG_ASSETS_CONNINFO already set, the embedded server is not used.
"""

import argparse
import datetime as dt
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

warnings.filterwarnings("ignore", module="platformdirs")

CONNINFO_ENV = "PG_ASSETS_CONNINFO"


def _home() -> Path:
    return Path.cwd() / ".pg_assets"


def _up(reload: bool = False) -> str:
    """Ensure a database: the user's (PG_ASSETS_CONNINFO) or the embedded one with demo data
    through yesterday (reloaded when it ends earlier: rows depend on their day alone, so the
    days already there come back identical)."""
    if os.environ.get(CONNINFO_ENV):
        return os.environ[CONNINFO_ENV]
    import psycopg

    from pg_assets.dev.demo_data import DEMO_START, demo_end, demo_loaded_through, load_demo
    from pg_assets.dev.embedded import start

    server = start(_home())
    end = demo_end()
    with psycopg.connect(server.conninfo, autocommit=True) as conn:
        through = demo_loaded_through(conn)
        complete = conn.execute(
            "SELECT to_regclass('public.inventory') IS NOT NULL"
            " AND to_regclass('public.payments') IS NOT NULL"
        ).fetchone()
        if reload or through is None or through < end or not (complete and complete[0]):
            print(f"loading demo tables ({DEMO_START} to {end}) ...", flush=True)
            with conn.transaction():
                load_demo(conn, end)
    os.environ[CONNINFO_ENV] = server.conninfo
    print(f"PostgreSQL ready: {server.conninfo}  (psql: {server.psql})", flush=True)
    print("  it keeps running after this command; stop it with: pg-assets stop", flush=True)
    return server.conninfo


def _dagster_home() -> Path:
    """DAGSTER_HOME if set, else ./.pg_assets/dagster holding a link to ./dagster.yaml.

    Dagster writes .nux/, logs/, .logs_queue/ and its storage into DAGSTER_HOME; keeping it
    under .pg_assets keeps the project folder clean while ./dagster.yaml stays the config."""
    if os.environ.get("DAGSTER_HOME"):
        home = Path(os.environ["DAGSTER_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        return home
    home = _home() / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    link, project_yaml = home / "dagster.yaml", Path.cwd() / "dagster.yaml"
    if project_yaml.exists() and not (link.exists() or link.is_symlink()):
        link.symlink_to(os.path.relpath(project_yaml, home))
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _workspace(home: Path) -> Path:
    project = Path.cwd() / "workspace.yaml"
    if project.exists():
        return project
    generated = home / "workspace.yaml"
    generated.write_text(
        "load_from:\n  - python_module:\n      module_name: pg_assets.definitions\n"
        "      location_name: pg_assets\n"
    )
    return generated


def _check(quiet: bool = False) -> int:
    """Validate the config against the live catalog; 0 ok, 1 could not check, 2 config error."""
    from pg_assets.catalog import UncheckableError, cache_path, check_tables
    from pg_assets.config import ConfigError, load_config

    try:
        config = load_config()
        checked = check_tables(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UncheckableError as e:
        print(f"error: could not check the configuration: {e}", file=sys.stderr)
        return 1
    for c in checked:
        where = "from config" if c.start_from == "config" else f"cached in {cache_path(config)}"
        if not quiet:
            print(
                f"{c.config.table}: ok ({len(c.info.columns)} columns, "
                f"{len(c.info.children)} partitions), first day {c.start} ({where})"
            )
    try:
        from pg_assets.assets.incremental import check_incremental
        from pg_assets.dev.cdc_cli import check_lines

        lines = list(check_incremental(config))
        problems = check_lines(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not quiet:
        for line in lines:
            print(line)
        for t in config.tables_of("cdc"):
            print(f"{t.table}: cdc, {'NOT READY' if problems else 'ready'}")
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 2 if problems else 0


def _up_for_the_demo_config() -> None:
    """With the demo config (no PG_ASSETS_CONFIG, the default conninfo variable), use the
    embedded server, as `demo` and `dev` do; a user's config uses the user's database."""
    from pg_assets.config import CONFIG_ENV, load_config

    try:
        conninfo_env = load_config().postgres.conninfo_env
    except Exception:  # reported by the command itself with its file, table and key
        conninfo_env = CONNINFO_ENV
    if conninfo_env == CONNINFO_ENV and not os.environ.get(CONFIG_ENV):
        _up()


def cmd_check(args: argparse.Namespace) -> int:
    _up_for_the_demo_config()
    return _check()


def cmd_demo(args: argparse.Namespace) -> int:
    _up(args.reload)
    if (rc := _check(quiet=True)) != 0:
        return rc
    from pg_assets.dev.demo_data import demo_end

    end = args.end or demo_end()
    return _materialize(args.start or end - dt.timedelta(days=6), end, tables=None, demo=True)


def cmd_backfill(args: argparse.Namespace) -> int:
    if args.end < args.start:
        print(f"error: --end {args.end} is before --start {args.start}", file=sys.stderr)
        return 2
    _up_for_the_demo_config()
    return _materialize(args.start, args.end, tables=args.table or None, demo=False)


def _materialize(start: dt.date, end: dt.date, *, tables: list[str] | None, demo: bool) -> int:
    """Days start..end of each table, in ranged runs of at most max_partitions_per_run days
    (what a backfill's runs do), in this process, recorded in the instance the UI reads."""
    _dagster_home()
    from dagster import DagsterInstance

    from pg_assets.assets.daily import asset_key
    from pg_assets.build import build_definitions
    from pg_assets.config import ConfigError, load_config
    from pg_assets.core.identifiers import parse_qualified_name

    try:
        config = load_config()
        defs = build_definitions(config)
        wanted = {parse_qualified_name(t) for t in tables} if tables else None
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    by_table = {t.name: t for t in config.tables_of("daily")}
    if wanted is not None and (unknown := wanted - set(by_table)):
        modes = {t.name: t.mode for t in config.tables}
        print(
            "error: "
            + "; ".join(
                f"table {name} is {modes[name]}, not daily (its sensor or its job lands it)"
                if name in modes
                else f"table {name} is not in {config.path}"
                for name in sorted(unknown, key=str)
            ),
            file=sys.stderr,
        )
        return 2
    days = [start + dt.timedelta(days=n) for n in range((end - start).days + 1)]
    selected = [t for t in config.tables_of("daily") if wanted is None or t.name in wanted]
    for table in selected:  # the days the asset has: from its first day to its last ended one
        partitions = defs.get_assets_def(asset_key(config.source, table)).partitions_def
        first, last = partitions.get_first_partition_key(), partitions.get_last_partition_key()
        if (
            first is None
            or last is None
            or not first <= start.isoformat() <= end.isoformat() <= last
        ):
            have = f"{first} to {last}" if first and last else "none yet"
            print(
                f"error: table {table.name}: {start} to {end} is not within its days ({have}: "
                f"from its first day to the last that has ended in {table.timezone})",
                file=sys.stderr,
            )
            return 2
    instance = DagsterInstance.get()
    print(f"materializing {len(days)} day(s) × {len(selected)} table(s) into {config.bronze.root}")
    print(
        f"{'asset':<28} {'day':<11} {'rows':>8} {'raw MB':>8} {'gz MB':>7} {'ratio':>6} {'MB/s':>7}  relation"
    )
    failed = 0
    for table in selected:
        key = asset_key(config.source, table)
        per_run = config.max_partitions_per_run(table)
        for i in range(0, len(days), per_run):
            chunk = days[i : i + per_run]
            result = ranged_run(defs, instance, key, chunk[0], chunk[-1])
            if not result.success:
                failed += 1
                for event in result.all_events:
                    if event.event_type_value == "STEP_FAILURE":
                        print(f"FAILED {event.step_failure_data.error.message.strip()}")
            for mat in result.get_asset_materialization_events():
                m = mat.materialization.metadata
                print(
                    f"{mat.asset_key.to_user_string():<28} {mat.partition:<11} "
                    f"{m['rows'].value:>8} {m['raw_bytes'].value / 1e6:>8.2f} "
                    f"{m['compressed_bytes'].value / 1e6:>7.2f} "
                    f"{m['compression_ratio'].value:>6.1f} {m['mb_per_s'].value:>7.1f}  "
                    f"{m['source_relation'].value} ({m['strategy'].value})"
                )
    if demo:
        from pg_assets.dev.writer import demo_batches

        failed += demo_batches(config, defs, instance)
        from pg_assets.dev.cdc_cli import demo_cdc

        failed += demo_cdc(config, defs, instance)
    print(f"\nBronze: {config.bronze.root}")
    if demo:
        print("Open the UI with: .venv/bin/pg-assets dev")
        print("PostgreSQL keeps running; stop it with: .venv/bin/pg-assets stop")
    return 1 if failed else 0


def ranged_run(defs, instance, key, first: dt.date, last: dt.date):
    """Materialize days first..last of one asset in one run (what a backfill run does)."""
    from dagster._core.storage.tags import (
        ASSET_PARTITION_RANGE_END_TAG,
        ASSET_PARTITION_RANGE_START_TAG,
    )

    job = defs.resolve_implicit_job_def_def_for_assets([key])
    return job.execute_in_process(
        instance=instance,
        asset_selection=[key],
        raise_on_error=False,
        tags={
            ASSET_PARTITION_RANGE_START_TAG: first.isoformat(),
            ASSET_PARTITION_RANGE_END_TAG: last.isoformat(),
        },
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
    )


def cmd_dev(args: argparse.Namespace) -> int:
    from pg_assets.dev.services import DagsterServices, ServicesError

    _up(args.reload)
    home = _dagster_home()
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    # Installed explicitly: a shell starts a background job with SIGINT ignored, and the
    # default SIGTERM would kill this process without stopping the webserver and daemon.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    services = DagsterServices(
        cwd=Path.cwd(), dagster_home=home, workspace=_workspace(home), host=args.host,
        port=args.port,
    )  # fmt: skip
    rc = 0
    try:
        services.start_webserver().start_daemon()
        print(
            f"Dagster UI: {services.url}  (DAGSTER_HOME={home}; webserver pid "
            f"{services.webserver.pid}, daemon pid {services.daemon.pid})\n"  # type: ignore[union-attr]
            f"Stop with Ctrl-C or `kill {os.getpid()}`.",
            flush=True,
        )
        while not stop.wait(1.0):
            services.check_alive()
    except ServicesError as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 1
    finally:
        services.stop()
    if received:
        print(f"received {signal.Signals(received[0]).name}: webserver and daemon stopped")
    print("PostgreSQL keeps running; stop it with: pg-assets stop", flush=True)
    return rc


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


def cmd_writer(args: argparse.Namespace) -> int:
    from pg_assets.dev.writer import run_writer

    conninfo = _up()
    print("writing to public.payments; Ctrl-C to stop", flush=True)
    run_writer(conninfo, rate=args.rate, updates=args.updates, seconds=args.seconds,
               long_every=args.long_every, long_s=args.long_s)  # fmt: skip
    return 0


COMMANDS: list[tuple[str, Callable[[argparse.Namespace], int], str]] = [
    (
        "demo",
        cmd_demo,
        "start the embedded PostgreSQL, load the demo tables (through yesterday) and "
        "materialize the last 7 days of each into ./.pg_assets/bronze",
    ),
    ("dev", cmd_dev, "the same server, then the Dagster UI and daemon (stop with Ctrl-C)"),
    (
        "backfill",
        cmd_backfill,
        "materialize days --start..--end of every daily table (or --table T) in ranged runs "
        "of max_partitions_per_run days, in this process (no daemon needed); only days that "
        "have ended",
    ),
    ("up", cmd_up, "start the embedded PostgreSQL (with the demo tables) and leave it running"),
    ("writer", cmd_writer, "keep writing to the demo's incremental table (public.payments)"),
    ("stop", cmd_stop, "stop the embedded PostgreSQL"),
    (
        "check",
        cmd_check,
        "validate the config ($PG_ASSETS_CONFIG or the demo) against the live catalog and "
        "cache first days; exits 1 if it could not check, 2 on a config error",
    ),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pg-assets",
        description="Land PostgreSQL tables in Bronze with Dagster: quick start and checks.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn, text in COMMANDS:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(fn=fn)
        if name in ("demo", "dev", "up"):
            p.add_argument("--reload", action="store_true", help="recreate the demo tables")
        if name == "demo":
            p.add_argument("--start", type=dt.date.fromisoformat, help="first day (YYYY-MM-DD)")
            p.add_argument("--end", type=dt.date.fromisoformat, help="last day (YYYY-MM-DD)")
        if name == "backfill":
            p.add_argument("--start", type=dt.date.fromisoformat, required=True, help="first day")
            p.add_argument("--end", type=dt.date.fromisoformat, required=True, help="last day")
            p.add_argument("--table", action="append", help="schema.table (repeatable)")
        if name == "dev":
            p.add_argument("--host", default="127.0.0.1", help="webserver address")
            p.add_argument("--port", type=int, default=3000, help="webserver port")
        if name == "writer":
            from pg_assets.dev.writer import add_arguments

            add_arguments(p)
    from pg_assets.dev.cdc_cli import add_parser

    add_parser(sub)  # `pg-assets cdc setup|drop|status`
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

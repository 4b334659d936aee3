"""`pg-assets cdc setup|drop|status` and the CDC lines of `pg-assets check`.

Thin: each command builds the source's `CdcSource` from the config file exactly as a run
does (`pg_assets.assets.cdc.cdc_source`) and calls the core (`pg_assets.core.cdc.run`).
"""

import argparse
import os
import sys
import uuid

import psycopg


def _source(config):  # noqa: ANN001, ANN202 - ProjectConfig → CdcSource
    from pg_assets.assets.cdc import cdc_source
    from pg_assets.build import build_resources

    resources = build_resources(config)
    return cdc_source(config, resources["postgres"], resources["bronze"])  # type: ignore[arg-type]


def check_lines(config) -> list[str]:  # noqa: ANN001
    """One line per CDC problem of the config's database (empty: ready, or no CDC tables)."""
    from pg_assets.core.cdc.slot import check_cdc
    from pg_assets.core.session import connect_kwargs, read_conninfo

    tables = [t.name for t in config.tables_of("cdc")]
    if not tables:
        return []
    pg = config.postgres
    try:
        conninfo = read_conninfo(pg.conninfo_env)
        with psycopg.connect(
            conninfo,
            autocommit=True,
            **connect_kwargs(pg.connect_timeout_s, 0, conninfo),  # type: ignore[arg-type]
        ) as conn:
            return check_cdc(
                conn, tables=tables, publication=config.publication_name, slot=config.slot_name
            )
    except (psycopg.Error, RuntimeError) as e:
        return [f"cannot check CDC: PostgreSQL is unreachable ({e})"]


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 20):,.1f} MB"


def cmd_cdc(args: argparse.Namespace) -> int:
    from pg_assets.config import ConfigError, load_config
    from pg_assets.core.cdc.lsn import format_lsn
    from pg_assets.core.cdc.reader import CdcError
    from pg_assets.core.cdc.run import assess, drop, setup, status

    try:
        config = load_config()
        if not config.tables_of("cdc"):
            print(f"error: {config.path}: no table has `mode: cdc`", file=sys.stderr)
            return 2
        if args.action == "write":
            return cmd_write(args)
        if not os.environ.get(config.postgres.conninfo_env):
            from pg_assets.dev.cli import _up

            _up()  # the embedded server, as `pg-assets up` starts it
        src = _source(config)
        run_id = f"cli-{uuid.uuid4().hex}"
        if args.action == "setup":
            result = setup(src, run_id, resnapshot=args.resnapshot)
            for note in result.notes:
                print(note)
            for s in result.snapshots:
                print(
                    f"snapshot {s.manifest['table']}: {s.stats.rows:,} rows at "
                    f"{format_lsn(s.ref.lsn)} → {s.uri}"
                )
            if not result.snapshots:
                print(f"replication slot {src.slot!r} and publication {src.publication!r} ready")
            return 0
        if args.action == "drop":
            if not args.yes:
                print(
                    f"this drops replication slot {src.slot!r} and publication "
                    f"{src.publication!r}: changes not yet in Bronze are lost, and the next "
                    "setup re-snapshots every CDC table. Bronze is not touched. Repeat with "
                    "--yes to do it",
                    file=sys.stderr,
                )
                return 2
            for line in drop(src, run_id) or ["nothing to drop"]:
                print(line)
            return 0
        st = status(src, run_id)
        health, head = st["health"], st["head"]
        verdict = assess(health, src.slot, int(config.cdc.max_lag_mb * (1 << 20)))
        print(f"{verdict.level.upper()}: {verdict.message}")
        if health is not None:
            print(
                f"slot: confirmed {format_lsn(health.confirmed_flush_lsn or 0)}, server at "
                f"{format_lsn(health.current_lsn)}, behind by {_mb(health.lag_bytes)}, "
                f"retains {_mb(health.retained_bytes)}, wal_status {health.wal_status}, "
                f"safe_wal_size {_mb(health.safe_wal_size) if health.safe_wal_size is not None else 'unlimited'}"
            )
        if head.committed:
            print(f"Bronze: last batch {head.committed.manifest}")
        if head.pending:
            print(f"Bronze: a {head.pending.kind} of run {head.pending.run_id} is pending")
        for p in head.unsettled:
            print(f"Bronze: {len(p.files)} file(s) of a {p.kind} of {p.who} await settling")
        for t in config.tables_of("cdc"):
            ref = head.snapshots.get(t.name)
            where = f"snapshot at {format_lsn(ref.lsn)}" if ref else "no snapshot yet"
            print(f"{t.table}: {where}")
        return 0 if verdict.level != "error" else 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CdcError, psycopg.Error, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def demo_cdc(config, defs, instance) -> int:  # noqa: ANN001
    """`pg-assets demo`, CDC part: the first run snapshots, a few transactions, the next run
    lands them as change files. Returns the number of failed runs."""
    import os

    from pg_assets.core.cdc.slot import wait_for_flush
    from pg_assets.dev.demo_data import cdc_demo_changes

    if not config.tables_of("cdc"):
        return 0
    job = defs.resolve_job_def(f"{config.source}__cdc")
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    print(f"\nchange data capture: slot {config.slot_name!r}, job {job.name}")
    failed = 0
    for step in ("snapshot", "changes"):
        if step == "changes":
            with psycopg.connect(os.environ[config.postgres.conninfo_env], autocommit=True) as c:
                for round_ in range(3):
                    cdc_demo_changes(c, round_)
                wait_for_flush(c)  # the embedded server commits asynchronously
        result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=quiet)
        if not result.success:
            failed += 1
            print(f"FAILED {job.name}: see the run in the UI")
            continue
        for mat in result.get_asset_materialization_events():
            m = {k: v.value for k, v in mat.materialization.metadata.items()}
            what = (
                f"snapshot of {m['snapshot_rows']} rows at {m['snapshot_lsn']}"
                if "snapshot_rows" in m
                else f"{m['changes']} changes (I {m['inserts']}, U {m['updates']}, "
                f"D {m['deletes']}) in {len(m['files'])} file(s), {m['first_commit_lsn']}.."
                f"{m['last_commit_lsn']}, lag {m['lag_seconds']:.1f} s"
            )
            print(f"{mat.asset_key.to_user_string():<28} {what}")
    print(
        "To watch the sensor: `pg-assets dev`, turn on the sensor "
        f"{config.source}__cdc_sensor, and run `pg-assets cdc write` in another terminal"
    )
    return failed


def cmd_write(args: argparse.Namespace) -> int:
    """`pg-assets cdc write`: demo transactions on public.inventory every few seconds."""
    import os
    import time

    from pg_assets.config import load_config
    from pg_assets.dev.demo_data import cdc_demo_changes

    config = load_config()
    conninfo = os.environ.get(config.postgres.conninfo_env)
    if not conninfo:
        from pg_assets.dev.cli import _up

        conninfo = _up()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        round_ = int(time.time()) % 100_000 * 10
        for n in range(args.rounds or 10**9):
            made = cdc_demo_changes(conn, round_ + n)
            print(f"{made} transactions on public.inventory", flush=True)
            time.sleep(args.every)
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("cdc", help="change data capture: setup, drop, status, write")
    p.set_defaults(fn=cmd_cdc)
    actions = p.add_subparsers(dest="action", required=True)
    s = actions.add_parser("setup", help="create the publication and slot; snapshot tables")
    s.add_argument(
        "--resnapshot", action="store_true", help="take a new snapshot of every CDC table"
    )
    d = actions.add_parser("drop", help="drop the slot and the publication (not Bronze)")
    d.add_argument("--yes", action="store_true", help="really drop them")
    actions.add_parser("status", help="slot health and Bronze position")
    w = actions.add_parser("write", help="demo: a few transactions on public.inventory, repeatedly")
    w.add_argument("--every", type=float, default=5, help="seconds between rounds")
    w.add_argument("--rounds", type=int, default=0, help="stop after this many (0: never)")

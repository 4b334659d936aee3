"""`pg-assets cdc setup|drop|status` and the CDC lines of `pg-assets check`.

Thin: each command builds the source's `CdcSource` from the config file exactly as a run
does (`pg_assets.assets.cdc.cdc_source`) and calls the core (`pg_assets.core.cdc.run`).
"""

import argparse
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
        with psycopg.connect(
            read_conninfo(pg.conninfo_env),
            autocommit=True,
            **connect_kwargs(pg.connect_timeout_s, 0),  # type: ignore[arg-type]
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
                f"safe_wal_size {_mb(health.safe_wal_size)}"
            )
        if head.committed:
            print(f"Bronze: last batch {head.committed.manifest}")
        if head.pending:
            print(f"Bronze: a {head.pending.kind} of run {head.pending.run_id} is pending")
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


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("cdc", help="change data capture: setup, drop, status")
    p.set_defaults(fn=cmd_cdc)
    actions = p.add_subparsers(dest="action", required=True)
    s = actions.add_parser("setup", help="create the publication and slot; snapshot tables")
    s.add_argument(
        "--resnapshot", action="store_true", help="take a new snapshot of every CDC table"
    )
    d = actions.add_parser("drop", help="drop the slot and the publication (not Bronze)")
    d.add_argument("--yes", action="store_true", help="really drop them")
    actions.add_parser("status", help="slot health and Bronze position")

"""A CDC table's snapshot: its full extract at a slot's consistent point, through the COPY core.

Change files only mean something on top of a starting state. `take_snapshots` creates a slot
with an exported snapshot (the source's slot itself on setup, a temporary one for a table added
or re-snapshotted later), imports that snapshot in a REPEATABLE READ transaction and COPYs each
table through `stream_copy` into Bronze, in the same CSV dialect, codec and blocks as a daily
extract, with the pinned session settings. Replay rule, recorded in each snapshot manifest: the
table = the snapshot, then every change row with `_commit_lsn >= lsn` applied in
(`_commit_lsn`, `_seq`) order. The run's change files never hold a row below that LSN for the
table (`ChangeWriter`'s floors), so readers may also just apply every committed change file.

Right after importing the snapshot the transaction locks every table (ACCESS SHARE, within
`lock_timeout`) and checks that none was truncated or rewritten since the slot's consistent
point: TRUNCATE and table rewrites (VACUUM FULL, CLUSTER, ALTER TABLE … TYPE) are not MVCC-safe,
and one committed between the slot's creation and the COPY would make the old snapshot read the
table as empty or partial, silently (a rewrite sends no change through the slot). Such a race
fails the run before anything is published; the next run (or `pg-assets cdc setup`) takes a
new snapshot. From the lock on, such DDL waits for the COPY.

Files are published under the journal's pending record first (see `batch.Journal`), so a crash
between publishing a snapshot and recording it leaves nothing a later run cannot clean up. The
manifests come last, after every table's data file is published and the journal has recorded
that they are coming (`before_commit`), each written create-only.
"""

import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pg_assets import __version__
from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.changes import table_display
from pg_assets.core.cdc.lsn import format_lsn, lsn_hex
from pg_assets.core.cdc.reader import PINNED_SETTINGS, CdcError, pin_session
from pg_assets.core.compression import Codec
from pg_assets.core.copy_stream import CopyStats, stream_copy
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import cdc_snapshot_file, cdc_snapshot_manifest
from pg_assets.core.planner import rewritten_since_snapshot
from pg_assets.core.publish import commit_create_only, file_facts
from pg_assets.core.session import connect_kwargs as session_kwargs
from pg_assets.sinks.base import Sink, StagingFile

REPLAY_RULE = (
    "apply the change rows with _commit_lsn >= lsn (all rows of committed change files) in "
    "(_commit_lsn, _seq) order onto this file"
)


@dataclass(frozen=True)
class SnapshotRef:
    """Where a table's current snapshot is, as the journal head records it."""

    table: QualifiedName
    lsn: int
    manifest: str  # relpath
    file: str  # relpath

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_name": self.table.schema,
            "table_name": self.table.name,
            "lsn": lsn_hex(self.lsn),
            "manifest": self.manifest,
            "file": self.file,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SnapshotRef":
        return cls(
            QualifiedName(d["schema_name"], d["table_name"]),
            int(d["lsn"], 16),
            d["manifest"],
            d["file"],
        )


@dataclass(frozen=True)
class TableSnapshot:
    ref: SnapshotRef
    stats: CopyStats
    manifest: dict[str, Any]
    uri: str


def snapshot_paths(
    source: str, tables: Sequence[QualifiedName], lsn: int, codec: Codec, run_id: str
) -> list[tuple[str, str]]:
    """(data, manifest) relpaths of each table's snapshot at `lsn` taken by run `run_id`."""
    return [
        (
            cdc_snapshot_file(source, t, lsn, run_id, codec.extension),
            cdc_snapshot_manifest(source, t, lsn),
        )
        for t in tables
    ]


def table_columns(conn: psycopg.Connection, table: QualifiedName) -> list[dict[str, str]]:
    """The columns pgoutput sends, in its order: not dropped, not generated (pgoutput leaves
    generated columns out by default, so the snapshot must too)."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " AND a.attgenerated = '' ORDER BY a.attnum",
        [table.schema, table.name],
    ).fetchall()
    if not rows:
        raise CdcError(f"table {table_display(table.schema, table.name)} does not exist")
    return [{"name": n, "type": t} for n, t in rows]


def _copy_statement(conn: psycopg.Connection, table: QualifiedName, columns: list[str]):
    (relkind,) = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        [table.schema, table.name],
    ).fetchone()  # type: ignore[misc]
    # ONLY for a plain table: inheritance children publish under their own names, while a
    # partitioned table's partitions publish under it (publish_via_partition_root)
    only = sql.SQL("ONLY ") if relkind == "r" else sql.SQL("")
    return sql.SQL("COPY (SELECT {} FROM {}{}) TO STDOUT (FORMAT csv, HEADER)").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in columns), only, table.identifier
    )


def copy_snapshot(
    conn: psycopg.Connection,
    *,
    source: str,
    slot: str,
    table: QualifiedName,
    lsn: int,
    sink: Sink,
    codec: Codec,
    level: int,
    run_id: str,
    block_size: int,
    temporary_slot: bool,
) -> TableSnapshot:
    """COPY one table inside the caller's transaction (which imported the exported snapshot
    and locked the table) into Bronze, and publish its data file. Its manifest is written by
    `commit_snapshot`. The caller has recorded both paths as pending."""
    where = f"snapshot of table {table_display(table.schema, table.name)}"
    data_rel, manifest_rel = snapshot_paths(source, [table], lsn, codec, run_id)[0]
    columns = table_columns(conn, table)
    staging: StagingFile | None = sink.open_staging(run_id, data_rel, codec.content_type)
    try:
        with conn.cursor() as cur:
            stats = stream_copy(
                cur,
                _copy_statement(conn, table, [c["name"] for c in columns]),
                staging,  # type: ignore[arg-type]
                codec.compressor(level),
                block_size=block_size,
            )
        published = sink.publish(staging, data_rel, expected_size=stats.compressed_bytes)  # type: ignore[arg-type]
        staging = None
    except Exception as e:
        if staging is not None:
            sink.discard(staging)
        raise CdcError(f"{where} failed: {e}") from e
    manifest = {
        "version": 1,
        "pg_assets_version": __version__,
        "kind": "cdc_snapshot",
        "source": source,
        "slot": slot,
        "table": table_display(table.schema, table.name),
        "schema_name": table.schema,
        "table_name": table.name,
        "lsn": lsn_hex(lsn),
        "lsn_pg": format_lsn(lsn),
        "replay": REPLAY_RULE,
        "temporary_slot": temporary_slot,
        **file_facts(data_rel, published, stats, codec, level),
        "path": data_rel,
        "columns": columns,
        "session": dict(PINNED_SETTINGS),
        "extracted_at": dt.datetime.now(dt.UTC).isoformat(),
        "seconds": round(stats.seconds, 3),
        "run_id": run_id,
    }
    return TableSnapshot(
        SnapshotRef(table, lsn, manifest_rel, data_rel), stats, manifest, published.uri
    )


def commit_snapshot(sink: Sink, snapshot: TableSnapshot, run_id: str) -> None:
    """Write a snapshot's manifest, create-only: its commit point."""
    t = snapshot.ref.table
    where = f"the manifest of the snapshot of table {table_display(t.schema, t.name)}"
    rel = snapshot.ref.manifest
    body = json.dumps(snapshot.manifest, indent=2).encode()
    outcome = commit_create_only(sink, run_id, rel, body)
    e = outcome.error
    if outcome.taken_by:
        raise CdcError(f"publishing {where} failed: {outcome.taken_by} wrote {rel}: {e}") from e
    if outcome.done is None:
        raise CdcError(
            f"publishing {where} failed and the lake could not be read back to tell whether "
            f"it happened ({e}); its data file is kept, the next run settles it"
        ) from e
    if not outcome.done:
        raise CdcError(f"publishing {where} failed: {e}") from e


def lock_tables(
    conn: psycopg.Connection, tables: Sequence[QualifiedName], lock_timeout_s: float
) -> None:
    """LOCK `tables` IN ACCESS SHARE MODE inside the transaction that imported the exported
    snapshot (the caller has set `lock_timeout`), then check that none was truncated or
    rewritten between the snapshot and the lock (see the module doc). Without ONLY: a
    partitioned table's partitions are what the COPY reads, and each must be held."""
    names = ", ".join(table_display(t.schema, t.name) for t in tables)
    try:
        conn.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                sql.SQL(", ").join(t.identifier for t in tables)
            )
        )
    except psycopg.errors.LockNotAvailable:
        raise CdcError(
            f"snapshot of {names}: gave up waiting {lock_timeout_s:g} s for a lock: DDL such "
            "as TRUNCATE, DROP or ALTER holds or awaits an exclusive lock on one of them; "
            "nothing was read, retry later or raise postgres.lock_timeout_s"
        ) from None
    except psycopg.errors.UndefinedTable as e:
        raise CdcError(f"snapshot of {names}: {e}") from None
    with conn.cursor() as cur:
        rewritten = rewritten_since_snapshot(cur, tables)
    if rewritten is not None:
        raise CdcError(
            f"snapshot of table {table_display(rewritten.schema, rewritten.name)}: it was "
            "truncated or rewritten (TRUNCATE, VACUUM FULL, CLUSTER, a rewriting ALTER TABLE) "
            "after the replication slot's snapshot was exported and before it could be locked, "
            "so that snapshot would read it as empty or partial; nothing was published. Run "
            "`pg-assets cdc setup` (or the next CDC run) again to take a new snapshot"
        )


def temporary_slot_name(slot: str) -> str:
    return f"{slot[:48]}_snap_{uuid.uuid4().hex[:8]}"


def take_snapshots(
    conninfo: str,
    *,
    slot: str,
    temporary: bool,
    tables: Sequence[QualifiedName],
    source: str,
    sink: Sink,
    codec: Codec,
    level: int,
    run_id: str,
    block_size: int,
    on_consistent_point: Callable[[int], None],
    before_commit: Callable[[], None] = lambda: None,
    connect_timeout_s: float = 10,
    create_timeout_s: float = 300,
    lock_timeout_s: float = 60,
    connect_kwargs: dict[str, Any] | None = None,
) -> tuple[int, list[TableSnapshot]]:
    """Create `slot` (or a temporary slot named after it) with an exported snapshot and COPY
    each of `tables` at it. `on_consistent_point(lsn)` runs before anything is published (the
    journal records the paths as pending there), `before_commit()` once every data file is
    published and before the first manifest is written. Returns the consistent LSN and the
    snapshots.

    One transaction for all tables: they are all at the same point, and the snapshot is
    released as soon as the last COPY ends (the exporting connection closes with the block)."""
    name = temporary_slot_name(slot) if temporary else slot
    kwargs = dict(connect_kwargs or {})
    with cdc_slot.exported_snapshot(
        conninfo,
        name,
        temporary=temporary,
        connect_timeout_s=connect_timeout_s,
        timeout_s=create_timeout_s,
        **kwargs,
    ) as exported:
        lsn = exported.consistent_lsn
        on_consistent_point(lsn)
        results = []
        with psycopg.connect(
            conninfo,
            **{**session_kwargs(connect_timeout_s, 0, conninfo), **kwargs},  # type: ignore[arg-type]
        ) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with conn.transaction():
                cdc_slot.import_snapshot(conn, exported)  # must be the first statement
                pin_session(conn)
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    [f"{max(1, int(lock_timeout_s * 1000))}ms"],
                )
                lock_tables(conn, tables, lock_timeout_s)
                for table in tables:
                    results.append(
                        copy_snapshot(
                            conn,
                            source=source,
                            slot=slot,
                            table=table,
                            lsn=lsn,
                            sink=sink,
                            codec=codec,
                            level=level,
                            run_id=run_id,
                            block_size=block_size,
                            temporary_slot=temporary,
                        )  # fmt: skip
                    )
    before_commit()
    for snapshot in results:
        commit_snapshot(sink, snapshot, run_id)
    return lsn, results

"""One CDC run of a source, end to end, without Dagster: setup, recovery, batches, advance.

    lock ─ check ─ journal (resolve pending) ─ slot (create + snapshot | advance if the lake is
    ahead) ─ continuity per table (snapshot what needs one, refuse a gap) ─ batches until the
    slot is drained ─ heartbeat when nothing decodable was pending

The Dagster multi-asset (`pg_assets.assets.cdc`), `pg-assets cdc setup|drop|status` and the
benchmark all call these functions, so what they do is the same. See `batch` for why each
step of a batch is where it is.

Continuity (`classify`): a table's changes are complete in Bronze from its snapshot LSN C up
to the slot's position S when either C >= S (nothing consumed since the snapshot), or the last
committed batch ends exactly at S and covered the table from the same snapshot (by induction,
every batch since C did). Otherwise:
  - the table is new, was just (re-)added to the publication, or was left out of the last batch
    (removed from the config and added back): it gets a new snapshot, through a temporary slot,
    at a point C2 >= S, and its changes apply from C2;
  - the slot has moved past the lake (advanced outside pg_assets, Bronze restored from an older
    copy, a lost slot recreated): the run fails and says to re-snapshot, never a silent gap.
"""

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.batch import (
    Committed,
    Head,
    Journal,
    Pending,
    TableChanges,
    batch_manifest,
    file_entry,
    manifest_path,
    table_of,
)
from pg_assets.core.cdc.changes import PartStats, TableKey, table_display
from pg_assets.core.cdc.lsn import format_lsn
from pg_assets.core.cdc.pgoutput import commit_datetime
from pg_assets.core.cdc.reader import Batch, CdcError, read_batch
from pg_assets.core.cdc.snapshot import SnapshotRef, TableSnapshot, snapshot_paths, take_snapshots
from pg_assets.core.compression import Codec
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import cdc_change_file
from pg_assets.core.publish import (
    advisory_lock,
    commit_create_only,
    commit_state,
    read_manifest,
)
from pg_assets.core.session import APPLICATION_NAME, connect_kwargs
from pg_assets.sinks.base import Published, Sink, StagingFile

MAX_BATCHES_PER_RUN = 20


class CdcConfigError(CdcError):
    """The database is not ready for CDC: one line per problem, each naming what to change."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class CdcSource:
    """Everything a run needs about one source's CDC: names, where Bronze is, how to connect.
    `conninfo` is a secret: it is never printed (repr=False) nor put in an error."""

    source: str
    slot: str
    publication: str
    tables: tuple[QualifiedName, ...]
    conninfo: str = field(repr=False)
    sink: Sink
    codec: Codec
    level: int
    block_size: int = 4 << 20
    batch_max_changes: int = 100_000
    connect_timeout_s: float = 10
    statement_timeout_s: float = 0
    lock_timeout_s: float = 60
    create_slot_timeout_s: float = 300
    max_batches: int = MAX_BATCHES_PER_RUN

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection:
        """A direct connection (not the pool's: CDC writes — slot advance, heartbeat — and the
        pool's are read-only), with the session pinned like every pg_assets connection."""
        kwargs = connect_kwargs(self.connect_timeout_s, self.statement_timeout_s, self.conninfo)
        return psycopg.connect(self.conninfo, autocommit=autocommit, **kwargs)  # type: ignore[arg-type]


@dataclass
class BatchSummary:
    manifest: str
    start_lsn: int
    end_lsn: int
    transactions: int
    changes: int
    skipped: int
    heartbeats: int
    files: int


@dataclass
class SyncResult:
    slot: str
    notes: list[str] = field(default_factory=list)
    snapshots: list[TableSnapshot] = field(default_factory=list)
    tables: dict[QualifiedName, TableChanges] = field(default_factory=dict)
    batches: list[BatchSummary] = field(default_factory=list)
    lag_seconds: dict[QualifiedName, float] = field(default_factory=dict)
    start_lsn: int | None = None  # the slot's position when the run started reading
    end_lsn: int | None = None  # and when it ended
    heartbeat: bool = False
    health: cdc_slot.SlotHealth | None = None  # after the run

    @property
    def changes(self) -> int:
        return sum(b.changes for b in self.batches)


def lock_key(source: CdcSource) -> str:
    return f"pg_assets:cdc:{source.source}:{source.slot}"


@contextmanager
def source_lock(conn: psycopg.Connection, src: CdcSource, run_id: str) -> Iterator[None]:
    """One run per slot at a time (a sensor run, a manual materialization, `pg-assets cdc`):
    a session-level advisory lock with a bounded wait, on the caller's autocommit connection."""

    def busy(holder: str) -> Exception:
        return CdcError(
            f"replication slot {src.slot!r}: {holder} holds it; gave up after waiting "
            f"{src.lock_timeout_s:g} s (postgres.lock_timeout_s)"
        )

    with advisory_lock(
        conn, lock_key(src), src.lock_timeout_s,
        application_name=f"pg_assets cdc {run_id[:8]}", busy=busy,
    ):  # fmt: skip
        yield


def wait_until_released(conn: psycopg.Connection, slot: str, timeout_s: float) -> None:
    """The slot is acquired by another backend while this run holds the source's lock: the
    session of a run that was killed, still finishing its last statement (a backend notices
    its client is gone only when it next talks to it). Wait for it, boundedly."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = conn.execute(
            "SELECT s.active_pid, a.application_name FROM pg_replication_slots s"
            " LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid"
            " WHERE s.slot_name = %s AND s.active",
            [slot],
        ).fetchone()
        if row is None:
            return
        if time.monotonic() > deadline:
            raise CdcError(
                f"replication slot {slot!r} is in use by PostgreSQL backend {row[0]} "
                f"({row[1] or 'no application_name'}) for more than {timeout_s:g} s "
                "(postgres.lock_timeout_s); only pg_assets may read this slot"
            )
        time.sleep(0.05)


def _missing_slot(src: CdcSource, head: Head) -> CdcError:
    where = f"up to {format_lsn(head.committed.end_lsn)}" if head.committed else "(snapshots only)"
    return CdcError(
        f"replication slot {src.slot!r} does not exist, but Bronze holds CDC data of source "
        f"{src.source!r} {where}: the slot was dropped and the changes since are lost. Run "
        "`pg-assets cdc setup` to create it and re-snapshot every CDC table"
    )


def classify(
    head: Head,
    tables: tuple[QualifiedName, ...],
    position: int,
    added: list[QualifiedName],
    publication: str = "",
) -> tuple[list[QualifiedName], list[QualifiedName], list[str]]:
    """(tables needing a snapshot, tables with a gap, a note per snapshot reason); see the
    module doc."""
    need, gaps, notes = [], [], []
    committed = head.committed
    at_lake_end = committed is not None and committed.end_lsn == position
    for t in tables:
        name = table_display(t.schema, t.name)
        snap = head.snapshots.get(t)
        if snap is None:
            need.append(t)
            notes.append(f"table {name}: no snapshot yet, taking one")
        elif t in added:
            need.append(t)
            notes.append(
                f"table {name} was missing from publication {publication!r} and was added "
                "back: its changes meanwhile were not decoded, taking a new snapshot"
            )
        elif snap.lsn >= position:
            continue
        elif at_lake_end and committed is not None and committed.tables.get(t) == snap.lsn:
            continue
        elif at_lake_end and committed is not None and t not in committed.tables:
            need.append(t)
            notes.append(
                f"table {name} was not in the last batch (removed from the config and added "
                "back?): its changes meanwhile were not kept, taking a new snapshot"
            )
        else:
            gaps.append(t)
    return need, gaps, notes


def _gap_error(src: CdcSource, head: Head, position: int, gaps: list[QualifiedName]) -> CdcError:
    lake = (
        f"the last batch in Bronze ends at {format_lsn(head.committed.end_lsn)}"
        if head.committed
        else "Bronze holds no batch since the snapshot"
    )
    names = ", ".join(table_display(t.schema, t.name) for t in gaps)
    return CdcError(
        f"replication slot {src.slot!r} is at {format_lsn(position)} but {lake}: changes of "
        f"{names} in between were consumed without landing in Bronze (the slot was advanced "
        "outside pg_assets, or Bronze was restored from an older copy). Re-snapshot with "
        "`pg-assets cdc setup --resnapshot`"
    )


def _snapshot(
    src: CdcSource,
    journal: Journal,
    head: Head,
    tables: list[QualifiedName],
    *,
    temporary: bool,
    run_id: str,
) -> list[TableSnapshot]:
    def record(lsn: int) -> None:
        paths = snapshot_paths(src.source, tables, lsn, src.codec, run_id)
        refs = [SnapshotRef(t, lsn, m, d) for t, (d, m) in zip(tables, paths, strict=True)]
        journal.begin(
            head,
            Pending(
                "snapshot",
                [m for _, m in paths],
                [d for d, _ in paths],
                run_id,
                snapshots=refs,
            ),
        )

    _, snaps = take_snapshots(
        src.conninfo,
        slot=src.slot,
        temporary=temporary,
        tables=tables,
        source=src.source,
        sink=src.sink,
        codec=src.codec,
        level=src.level,
        run_id=run_id,
        block_size=src.block_size,
        on_consistent_point=record,
        before_commit=lambda: journal.committing(head),
        connect_timeout_s=src.connect_timeout_s,
        create_timeout_s=src.create_slot_timeout_s,
        lock_timeout_s=src.lock_timeout_s,
        connect_kwargs={"application_name": APPLICATION_NAME},
    )
    for s in snaps:
        head.snapshots[s.ref.table] = s.ref
    head.pending = None
    journal.save(head)
    return snaps


def prepare(
    src: CdcSource,
    admin: psycopg.Connection,
    journal: Journal,
    result: SyncResult,
    *,
    run_id: str,
    recreate: bool = False,
    resnapshot: bool = False,
) -> tuple[Head, int]:
    """Everything before the first batch; returns the head and the slot's position.
    `recreate`: a missing slot is created (and every table re-snapshotted) even when Bronze
    holds history (`pg-assets cdc setup`); a run refuses that, since changes were lost."""
    problems = cdc_slot.check_cdc(
        admin, tables=list(src.tables), publication=src.publication, slot=src.slot
    )
    if problems:
        raise CdcConfigError(problems)
    head, notes = journal.load(list(src.tables))
    result.notes += notes
    health = cdc_slot.slot_health(admin, src.slot)
    if health is None:
        if head.has_history and not recreate:
            raise _missing_slot(src, head)
        cdc_slot.ensure_publication(
            admin, src.publication, list(src.tables), lock_timeout_s=src.lock_timeout_s
        )
        head.committed = None  # a new slot starts a new chain; the old one stays in Bronze
        result.snapshots += _snapshot(
            src, journal, head, list(src.tables), temporary=False, run_id=run_id
        )
        result.notes.append(
            f"created replication slot {src.slot!r} and publication {src.publication!r}; "
            f"snapshotted {len(src.tables)} table(s) at {format_lsn(result.snapshots[0].ref.lsn)}"
        )
        health = cdc_slot.slot_health(admin, src.slot)
        assert health is not None and health.confirmed_flush_lsn is not None
        return head, health.confirmed_flush_lsn
    assert health.confirmed_flush_lsn is not None  # check_cdc reports a lost slot
    if health.active:
        wait_until_released(admin, src.slot, src.lock_timeout_s)
    added = cdc_slot.ensure_publication(
        admin, src.publication, list(src.tables), lock_timeout_s=src.lock_timeout_s
    )
    position = health.confirmed_flush_lsn
    result.notes += journal.catch_up(head, position)
    if head.committed is not None and head.committed.end_lsn > position:
        result.notes.append(
            f"the last batch ({head.committed.manifest}) is committed but replication slot "
            f"{src.slot!r} was still at {format_lsn(position)}: advanced it to "
            f"{format_lsn(head.committed.end_lsn)}"
        )
        position = cdc_slot.advance_slot(admin, src.slot, head.committed.end_lsn)
    need, gaps, notes = classify(head, src.tables, position, added, src.publication)
    if resnapshot:
        need, gaps = list(src.tables), []
        notes = [f"re-snapshotting {len(need)} table(s) as asked"]
    if gaps:
        raise _gap_error(src, head, position, gaps)
    if need:
        result.notes += notes
        result.snapshots += _snapshot(src, journal, head, need, temporary=True, run_id=run_id)
    return head, position


def _type_names(conn: psycopg.Connection, files: list[PartStats]) -> dict[tuple[int, int], str]:
    pairs = sorted({(c.type_oid, c.type_modifier) for f in files for c in f.columns})
    if not pairs:
        return {}
    rows = conn.execute(
        "SELECT u.o::int8, u.m, format_type(u.o, u.m) FROM unnest(%s::oid[], %s::int[]) AS u(o, m)",
        [[o for o, _ in pairs], [m for _, m in pairs]],
    ).fetchall()
    return {(o, m): t for o, m, t in rows}


def _server_now(conn: psycopg.Connection) -> dt.datetime:
    (now,) = conn.execute("SELECT clock_timestamp()").fetchone()  # type: ignore[misc]
    return now


def one_batch(
    src: CdcSource,
    reader: psycopg.Connection,
    admin: psycopg.Connection,
    journal: Journal,
    head: Head,
    position: int,
    result: SyncResult,
    *,
    run_id: str,
) -> Batch:
    """Read, publish, commit and consume one batch (see `batch` for the protocol)."""
    floors = {TableKey(t.schema, t.name): head.snapshots[t].lsn for t in src.tables}
    staged: dict[tuple[TableKey, int], StagingFile] = {}
    sink, codec = src.sink, src.codec
    token = uuid.uuid4().hex[:8]  # this attempt's: see `layout.cdc_change_file`

    def open_part(table: TableKey, part: int) -> StagingFile:
        # the final name needs the batch's end, known once read: staged under a provisional one
        rel = cdc_change_file(src.source, table_of(table), position, position, token, part, ".tmp")
        staged[(table, part)] = f = sink.open_staging(run_id, rel, codec.content_type)
        return f

    try:
        batch = read_batch(
            reader,
            src.slot,
            src.publication,
            open_part,
            lambda: codec.compressor(src.level),
            max_messages=src.batch_max_changes,
            block_size=src.block_size,
            floors=floors,
        )
        if not batch.empty and batch.start_lsn != position:
            raise CdcError(
                f"replication slot {src.slot!r} moved from {format_lsn(position)} to "
                f"{format_lsn(batch.start_lsn)} while this run held it: is another consumer "
                "using the slot? Only pg_assets may read or advance it"
            )
    except BaseException:
        for f in staged.values():
            sink.discard(f)
        raise
    if batch.empty:
        return batch
    assert batch.end_lsn is not None
    start, end = batch.start_lsn, batch.end_lsn
    paths = {
        (f.table, f.part): cdc_change_file(
            src.source, table_of(f.table), start, end, token, f.part, codec.extension
        )
        for f in batch.files
    }
    manifest_rel = manifest_path(src.source, batch)
    covered = {t: head.snapshots[t].lsn for t in src.tables}
    this = Committed(manifest_rel, start, end, covered)
    body: bytes | None = None
    committed: bool | None = False  # None: could not tell
    try:
        types = _type_names(admin, batch.files)
        journal.begin(
            head, Pending("batch", [manifest_rel], list(paths.values()), run_id, batch=this)
        )
        published: dict[tuple[TableKey, int], Published] = {}
        for f in batch.files:
            key = (f.table, f.part)
            published[key] = sink.publish(
                staged.pop(key), paths[key], expected_size=f.compressed_bytes
            )
        entries = [
            file_entry(f, paths[(f.table, f.part)], published[(f.table, f.part)], types)
            for f in batch.files
        ]
        manifest = batch_manifest(
            source=src.source,
            batch=batch,
            tables=covered,
            files=entries,
            codec=codec,
            level=src.level,
            run_id=run_id,
        )
        body = json.dumps(manifest, indent=2).encode()
        admin.execute("SELECT 1")  # still connected, so still holding the slot's lock
        # create-only: whichever run commits first owns the batch from `start`
        outcome = commit_create_only(sink, run_id, manifest_rel, body)
        committed, e = outcome.done, outcome.error
        if outcome.taken_by:
            raise CdcError(
                f"replication slot {src.slot!r}: {outcome.taken_by} committed the batch from "
                f"{format_lsn(start)} while this run was publishing its own (this run's lock on "
                f"the slot was lost with its session), so this run's {len(paths)} change "
                f"file(s) are deleted: {e}"
            ) from e
        if committed is None:
            raise CdcError(
                f"publishing batch manifest {manifest_rel} failed and the lake could not be "
                f"read back to tell whether it happened ({e}); its change files are kept, "
                "and the next run settles the batch (committed, or read again)"
            ) from e
        if not committed:
            raise CdcError(
                f"publishing batch manifest {manifest_rel} failed, so the batch is not "
                f"committed and will be read again: {e}"
            ) from e
    except BaseException:
        for f in staged.values():
            sink.discard(f)
        if committed is False and body is not None:  # interrupted in the commit: look
            committed = commit_state(sink, manifest_rel, body)
        if committed is False:
            for rel in paths.values():  # this attempt's names: nobody else's files
                try:
                    sink.delete(rel)
                except Exception:
                    pass  # still listed in the pending record: a later run deletes it
        raise
    # committed: the lake holds the batch; only now may the slot let go of it
    head.committed = this
    head.pending = None
    journal.drop_losers(head, manifest_rel)
    now = _server_now(admin)
    cdc_slot.advance_slot(admin, src.slot, end)
    for f in batch.files:
        table = table_of(f.table)
        changes = result.tables.setdefault(table, TableChanges(table))
        entry = next(e for e in entries if e["path"] == paths[(f.table, f.part)])
        changes.add(f, entry["path"], entry["uri"], entry["columns"])
        if f.last_commit_time is not None:
            result.lag_seconds[table] = (now - commit_datetime(f.last_commit_time)).total_seconds()
    result.batches.append(
        BatchSummary(
            manifest_rel,
            start,
            end,
            batch.transactions,
            batch.changes,
            batch.skipped,
            batch.heartbeats,
            len(batch.files),
        )
    )
    return batch


def sync(
    src: CdcSource,
    run_id: str,
    *,
    heartbeat: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> SyncResult:
    """One run: prepare (setup on first use), then batches until the slot is drained or
    `max_batches` were committed. When the first read finds nothing decodable although the
    server wrote WAL since the slot's position, a heartbeat gives the slot a commit to advance
    to, so WAL of other tables is not held back."""
    result = SyncResult(src.slot)
    journal = Journal(src.sink, src.source, src.slot, run_id)
    with src.connect(autocommit=True) as admin, src.connect() as reader:
        with source_lock(admin, src, run_id):
            head, position = prepare(src, admin, journal, result, run_id=run_id)
            for note in result.notes:
                log(note)
            result.start_lsn = result.end_lsn = position
            before = cdc_slot.slot_health(admin, src.slot)
            beat = False
            while len(result.batches) < src.max_batches:
                batch = one_batch(
                    src, reader, admin, journal, head, position, result, run_id=run_id
                )
                if batch.empty:
                    lag = before.lag_bytes if before else 0
                    if heartbeat and not beat and not result.batches and lag:
                        cdc_slot.emit_heartbeat(admin, src.slot)
                        beat = result.heartbeat = True
                        continue
                    break
                assert batch.end_lsn is not None
                position = result.end_lsn = batch.end_lsn
                log(
                    f"batch {format_lsn(batch.start_lsn)}..{format_lsn(batch.end_lsn)}: "
                    f"{batch.transactions} transaction(s), {batch.changes} change(s) in "
                    f"{len(batch.files)} file(s)"
                )
                if batch.messages < src.batch_max_changes:
                    # the read reached the end of the WAL: another would decode the same WAL
                    # again from the slot's restart point only to find nothing; what arrived
                    # since is the next run's
                    break
            if result.batches:
                journal.save(head)  # the head catches up with the last commit
            result.health = cdc_slot.slot_health(admin, src.slot)
    return result


def setup(src: CdcSource, run_id: str, *, resnapshot: bool = False) -> SyncResult:
    """`pg-assets cdc setup`: publication, slot and snapshots, without reading changes. Also
    the way back after a lost or dropped slot (the slot is created and every table
    re-snapshotted) and after a gap (`resnapshot`)."""
    result = SyncResult(src.slot)
    journal = Journal(src.sink, src.source, src.slot, run_id)
    with src.connect(autocommit=True) as admin:
        with source_lock(admin, src, run_id):
            prepare(
                src, admin, journal, result, run_id=run_id, recreate=True, resnapshot=resnapshot
            )
            result.health = cdc_slot.slot_health(admin, src.slot)
    return result


def drop(src: CdcSource, run_id: str) -> list[str]:
    """`pg-assets cdc drop`: the slot and the publication. Bronze is left as it is."""
    done = []
    with src.connect(autocommit=True) as admin:
        with source_lock(admin, src, run_id):
            try:
                if cdc_slot.drop_slot(admin, src.slot):
                    done.append(f"dropped replication slot {src.slot!r}")
            except psycopg.errors.ObjectInUse as e:
                raise CdcError(
                    f"replication slot {src.slot!r} is in use by another connection; stop it "
                    f"and retry: {e}"
                ) from e
            if cdc_slot.drop_publication(admin, src.publication):
                done.append(f"dropped publication {src.publication!r}")
    return done


def status(src: CdcSource, run_id: str) -> dict[str, Any]:
    """Slot health and the lake's position, read-only (no lock, nothing written)."""
    with src.connect(autocommit=True) as admin:
        health = cdc_slot.slot_health(admin, src.slot)
    journal = Journal(src.sink, src.source, src.slot, run_id)
    doc = read_manifest(src.sink, journal.head_path)  # as stored: pending not resolved
    head = Head.from_json(doc) if doc else Head(src.source, src.slot)
    return {"health": health, "head": head}


# -- watching the slot (the sensor, the asset check, `pg-assets cdc status`) -----------------

HEARTBEAT_BYTES = 16 << 20


@dataclass(frozen=True)
class Verdict:
    level: str  # "ok" | "warn" | "error"
    message: str


def assess(health: cdc_slot.SlotHealth | None, slot: str, max_lag_bytes: int) -> Verdict:
    """What the slot's state means for the lake and the source, with the fix."""
    if health is None:
        return Verdict(
            "error",
            f"replication slot {slot!r} does not exist: no change is being kept for Bronze. "
            "Materialize the CDC assets (or `pg-assets cdc setup`) to create it",
        )
    mb = (health.retained_bytes or 0) / (1 << 20)
    if health.lost:
        return Verdict(
            "error",
            f"replication slot {slot!r} is lost (wal_status={health.wal_status}"
            f"{', ' + health.invalidation_reason if health.invalidation_reason else ''}): "
            "PostgreSQL removed WAL it still needed, so changes are missing. Drop it and "
            "re-snapshot: `pg-assets cdc drop --yes && pg-assets cdc setup`",
        )
    if health.wal_status == "unreserved":
        return Verdict(
            "error",
            f"replication slot {slot!r} is about to be lost: it retains {mb:,.0f} MB of WAL, "
            "beyond max_slot_wal_keep_size, and the next checkpoint may remove it. Run the CDC "
            "job now (turn its sensor on) and raise max_slot_wal_keep_size",
        )
    if health.retained_bytes is not None and health.retained_bytes > max_lag_bytes:
        return Verdict(
            "warn",
            f"replication slot {slot!r} retains {mb:,.0f} MB of WAL (cdc.max_lag_mb: "
            f"{max_lag_bytes / (1 << 20):,.0f}), which the source's disk must hold: turn the CDC "
            "sensor on or run the CDC job; a long transaction on the source also holds it "
            "(pg_stat_activity.xact_start)",
        )
    return Verdict("ok", f"replication slot {slot!r} retains {mb:,.1f} MB of WAL")


@dataclass(frozen=True)
class PollDecision:
    run_key: str | None  # None: no run
    reason: str


def poll(
    conn: psycopg.Connection, slot: str, publication: str, *, heartbeat_bytes: int
) -> PollDecision:
    """Whether a run would find work, cheaply: the slot's catalog row, then (only when WAL was
    written since its position) a peek that stops after the first decoded transaction. The
    run key holds the slot's position and the WAL position, so a tick never requests the same
    work twice and a failed run is retried once more WAL arrives."""
    health = cdc_slot.slot_health(conn, slot)
    if health is None:
        (current,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]
        return PollDecision(
            f"{slot}:create:{current}",
            f"replication slot {slot!r} does not exist: a run sets it up",
        )
    if health.lost:
        return PollDecision(
            f"{slot}:lost:{health.restart_lsn or 0}",
            f"replication slot {slot!r} is lost: a run reports it (once)",
        )
    assert health.confirmed_flush_lsn is not None
    key = f"{slot}:{format_lsn(health.confirmed_flush_lsn)}:{format_lsn(health.current_lsn)}"
    if health.wal_status == "unreserved":
        return PollDecision(key, f"replication slot {slot!r} is about to be lost: consuming now")
    if not health.lag_bytes:
        return PollDecision(
            None,
            f"nothing new: the slot is at the server's WAL position {format_lsn(health.current_lsn)}",
        )
    try:
        with conn.transaction():
            (pending,) = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM pg_logical_slot_peek_binary_changes(%s,"
                " NULL, 1, 'proto_version', '1', 'publication_names', %s) LIMIT 1) s",
                [slot, publication],
            ).fetchone()  # type: ignore[misc]
    except psycopg.errors.ObjectInUse:
        return PollDecision(None, f"replication slot {slot!r} is in use by another session")
    if pending:
        return PollDecision(key, f"changes pending after {format_lsn(health.confirmed_flush_lsn)}")
    if health.lag_bytes >= heartbeat_bytes:
        return PollDecision(
            key,
            f"{health.lag_bytes / (1 << 20):,.0f} MB of WAL without published changes: a run "
            "moves the slot past it (heartbeat)",
        )
    return PollDecision(
        None,
        f"no published change pending ({health.lag_bytes:,} bytes of other WAL since "
        f"{format_lsn(health.confirmed_flush_lsn)})",
    )

"""Exactly once in Bronze: how a batch of changes is published, committed and consumed.

A batch covers the slot's stream from its position S (confirmed_flush_lsn when read) to E, the
end of the last commit record read: every transaction that committed in between, whole. Its
change files are named after (S, E) and the attempt's token; its manifest, the commit point,
after S alone:

    1. read (peek: the slot does not move) into staging files           crash: nothing visible
    2. record the batch as pending in `_cdc/<slot>/_head.json`           crash: nothing visible
    3. publish each change file under its final name                     crash: orphans, listed
    4. publish `_cdc/<slot>/<S>.json`, create-only  ← THE COMMIT POINT     in the pending record
    5. advance the slot to E (pg_replication_slot_advance)               crash: lake ahead
    6. the head records the batch as committed (lazily: with the next pending record)

**One batch per start.** The slot's advisory lock belongs to the run's PostgreSQL session. If
that session dies (failover, `pg_terminate_backend`, `idle_session_timeout`) while the run
publishes, another run takes the lock and reads from the same S, since the slot did not move:
two batches S-E and S-E' would put every change of S-E in Bronze twice. The commit point is
therefore named by S alone and written create-only (a conditional rename on ADLS, a lock
around check and rename locally): whichever run commits first owns S; the other's commit
fails, and it deletes its own change files (named with its own token, so never the winner's)
and fails naming the winner. Slot positions are only ever a slot's creation point or the end
of a committed batch, so the committed batches form one chain, each starting where the one
before ended, and `Journal.catch_up` follows it from what the head knows: `<end>.json`,
until one is missing.

**The head is a cache, never a commit point**, and is only written as a compare-and-swap on
the etag this run last read or wrote: a run that lost its lock fails at its next write of the
head instead of overwriting what the lock's new holder recorded. It saves listing the journal
and the table folders, which grow forever, on every run; a missing head is rebuilt from
listings (`rebuild_head`).

**What a later run may delete.** A file is deleted only when no committed manifest names it
and none ever can (`Journal.load`, `settle`):
  - a pending batch from S whose `<S>.json` exists and does not list it: S is taken, no other
    batch from S can commit. If `<S>.json` is missing, the run that recorded it may be alive
    (it lost its lock, but not its process) and about to commit: its files are kept, listed
    in the head as unsettled, and deleted by the run that commits from S (`drop_losers`).
  - a pending snapshot whose manifests are missing, unless its run had marked it committing:
    a snapshot's run writes the head (compare-and-swap) right before its manifests, so once
    this run has saved the head over the record, that run can no longer get there. One
    marked committing is kept until its manifests appear (they may be on their way).
  - never when the lake could not be read: "could not tell" is never taken as "not there".
Then, if the lake's last batch ends beyond the slot (a crash between 4 and 5, or a server
crash that forgot an advance), the slot is advanced there before anything is read. The slot
never moves before the lake holds the changes, and the lake never commits a range twice.
"""

import datetime as dt
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from pg_assets import __version__
from pg_assets.core.cdc.changes import PartStats, TableKey, table_display
from pg_assets.core.cdc.lsn import format_lsn, lsn_hex
from pg_assets.core.cdc.pgoutput import commit_datetime
from pg_assets.core.cdc.reader import PINNED_SETTINGS, Batch, CdcError
from pg_assets.core.cdc.snapshot import SnapshotRef
from pg_assets.core.compression import Codec
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import (
    cdc_batch_manifest,
    cdc_folder,
    cdc_head,
    cdc_journal,
    encode_segment,
)
from pg_assets.core.publish import commit_state, read_manifest, read_manifest_at
from pg_assets.sinks.base import FileInfo, PreconditionFailed, Published, Sink

HEAD_VERSION = 2
MANIFEST_VERSION = 2
# `<S>.json`; layout v1's `<S>-<E>.json` too, so a head rebuilt over an older lake finds it
_BATCH_NAME = re.compile(r"([0-9A-F]{16})(?:-[0-9A-F]{16})?\.json")


@dataclass
class Committed:
    """The lake's last committed batch: its range and the tables it covered, each with the
    snapshot LSN its changes were kept from (how continuity is checked, see `classify`)."""

    manifest: str
    start_lsn: int
    end_lsn: int
    tables: dict[QualifiedName, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "start_lsn": lsn_hex(self.start_lsn),
            "end_lsn": lsn_hex(self.end_lsn),
            "tables": [
                {"schema_name": t.schema, "table_name": t.name, "snapshot_lsn": lsn_hex(lsn)}
                for t, lsn in sorted(self.tables.items())
            ],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Committed":
        return cls.from_manifest(d["manifest"], d)

    @classmethod
    def from_manifest(cls, relpath: str, m: dict[str, Any]) -> "Committed":
        return cls(
            relpath,
            int(m["start_lsn"], 16),
            int(m["end_lsn"], 16),
            {
                QualifiedName(t["schema_name"], t["table_name"]): int(t["snapshot_lsn"], 16)
                for t in m["tables"]
            },
        )


@dataclass
class Pending:
    """What a run is about to publish: files, and the manifests that would commit them."""

    kind: str  # "batch" | "snapshot"
    manifests: list[str]
    files: list[str]
    run_id: str
    batch: Committed | None = None  # kind "batch": what it commits
    snapshots: list[SnapshotRef] = field(default_factory=list)  # kind "snapshot"
    committing: bool = False  # kind "snapshot": its manifests may be written from now on

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "manifests": self.manifests,
            "files": self.files,
            "run_id": self.run_id,
            "batch": self.batch.to_json() if self.batch else None,
            "snapshots": [s.to_json() for s in self.snapshots],
            "committing": self.committing,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Pending":
        return cls(
            d["kind"],
            list(d["manifests"]),
            list(d["files"]),
            d.get("run_id", ""),
            Committed.from_json(d["batch"]) if d.get("batch") else None,
            [SnapshotRef.from_json(s) for s in d.get("snapshots", [])],
            bool(d.get("committing", False)),
        )

    @property
    def who(self) -> str:
        return f"run {self.run_id[:8]}" if self.run_id else "a run"


@dataclass
class Head:
    source: str
    slot: str
    committed: Committed | None = None
    pending: Pending | None = None
    snapshots: dict[QualifiedName, SnapshotRef] = field(default_factory=dict)
    # other runs' records whose outcome cannot be told yet (see the module doc)
    unsettled: list[Pending] = field(default_factory=list)

    @property
    def has_history(self) -> bool:
        return self.committed is not None or bool(self.snapshots)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": HEAD_VERSION,
            "kind": "cdc_head",
            "note": "a cache of the journal; the batch manifests beside it are the commit points",
            "source": self.source,
            "slot": self.slot,
            "committed": self.committed.to_json() if self.committed else None,
            "pending": self.pending.to_json() if self.pending else None,
            "unsettled": [p.to_json() for p in self.unsettled],
            "snapshots": [s.to_json() for _, s in sorted(self.snapshots.items())],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Head":
        return cls(
            d["source"],
            d["slot"],
            Committed.from_json(d["committed"]) if d.get("committed") else None,
            Pending.from_json(d["pending"]) if d.get("pending") else None,
            {ref.table: ref for ref in map(SnapshotRef.from_json, d.get("snapshots", []))},
            [Pending.from_json(p) for p in d.get("unsettled", [])],
        )

    def adopt(self, relpath: str, manifest: dict[str, Any]) -> bool:
        """Take a committed batch manifest as the last batch if it is further along."""
        found = Committed.from_manifest(relpath, manifest)
        if self.committed is not None and found.end_lsn <= self.committed.end_lsn:
            return False
        self.committed = found
        return True


class Journal:
    """The lake side of one source's slot: the head, the pending record, batch manifests."""

    def __init__(self, sink: Sink, source: str, slot: str, run_id: str) -> None:
        self.sink, self.source, self.slot, self.run_id = sink, source, slot, run_id
        self.head_path = cdc_head(source, slot)
        self._at: FileInfo | None = None  # the head as this run last read or wrote it

    def save(self, head: Head) -> None:
        """Write the head if it is still the one this run last read or wrote."""
        body = json.dumps(head.to_json(), indent=2).encode()
        at = self._at
        try:
            published = self.sink.write_bytes(
                self.run_id, self.head_path, body, "application/json",
                if_match=at.etag if at else None, if_none_match=at is None,
            )  # fmt: skip
        except PreconditionFailed as e:
            raise CdcError(
                f"replication slot {self.slot!r}: another run wrote {self.head_path} since this "
                "run read it (this run's lock on the slot was lost with its session, or a run "
                "that had lost it wrote late), so this run stops here and the next one settles "
                f"the lake ({e})"
            ) from e
        except Exception as e:
            # stat, read, stat: the etag kept must be that of our bytes, not of a write by the
            # lock's new holder landing between the read and a later stat
            try:
                before = self.sink.stat(self.head_path)
            except Exception:
                before = None
            state = commit_state(self.sink, self.head_path, body)
            if state is None:
                raise CdcError(
                    f"writing {self.head_path} failed and it could not be read back to tell "
                    f"whether it happened: {e}"
                ) from e
            if not state:
                raise CdcError(f"writing {self.head_path} failed: {e}") from e
            try:
                after = self.sink.stat(self.head_path)
            except Exception as check:
                raise CdcError(f"reading back {self.head_path} failed: {check}") from e
            if before is None or after is None:
                raise CdcError(
                    f"writing {self.head_path} failed ({e}), and reading it back failed too: "
                    "this run stops here, and the next one settles the lake"
                ) from e
            if before.etag != after.etag:
                raise CdcError(
                    f"writing {self.head_path} failed ({e}), and it changed again while this "
                    "run read it back: another run holds the slot's lock, so this run stops here"
                ) from e
            self._at = after
            return
        self._at = FileInfo(published.size, published.etag)

    def load(self, tables: list[QualifiedName]) -> tuple[Head, list[str]]:
        """The head with the records of earlier runs settled: committed ones dropped, those
        that can never commit deleted, the others kept as unsettled. Returns the head and a
        line per thing recovered, for the run's log."""
        try:
            self._at, doc = read_manifest_at(self.sink, self.head_path)
        except Exception as e:
            raise CdcError(f"reading {self.head_path} failed: {e}") from e
        notes: list[str] = []
        if doc is None:
            head, notes = rebuild_head(self.sink, self.source, self.slot, tables)
        else:
            head = Head.from_json(doc)
        records = ([head.pending] if head.pending else []) + head.unsettled
        if records:
            head.pending = None
            kept, lost = self.settle(head, records, notes)
            head.unsettled = kept + lost
            self.save(head)  # first: see Pending.committing
            for p in lost:
                self._delete(p.files)
            head.unsettled = kept  # recorded with the next save
        return head, notes

    def settle(
        self, head: Head, records: list[Pending], notes: list[str]
    ) -> tuple[list[Pending], list[Pending]]:
        """(records to keep, records whose files can never be committed) for records of
        earlier runs; committed ones update the head and are dropped."""
        kept, lost = [], []
        for p in records:
            if p.kind == "batch":
                rel = p.manifests[0]
                try:
                    manifest = read_manifest(self.sink, rel)
                except Exception as e:
                    kept.append(p)
                    notes.append(f"batch {rel} of {p.who}: the lake could not be read ({e}); kept")
                    continue
                if manifest is None:
                    kept.append(p)
                    notes.append(
                        f"batch {rel} of {p.who} is not committed: its {len(p.files)} file(s) are "
                        "kept until a batch from the same position commits (that run may have "
                        "lost its lock and still be publishing)"
                    )
                else:
                    # Only what the committed manifest does not name can go: a record rebuilt
                    # from listings (`rebuild_head`) may hold the files of several attempts
                    # from the same position, one of which may be the one that committed.
                    named = {f["path"] for f in manifest["files"]}
                    head.adopt(rel, manifest)
                    if any(f in named for f in p.files):
                        notes.append(f"batch {rel} of {p.who} was committed")
                    if extra := [f for f in p.files if f not in named]:
                        lost.append(Pending("batch", p.manifests, extra, p.run_id))
                        notes.append(
                            f"batch {rel} was committed by run "
                            f"{str(manifest.get('run_id'))[:8]}: deleted {len(extra)} file(s) "
                            f"of {p.who} it does not name"
                        )
                continue
            missing, unknown, beaten = [], False, []
            for ref in p.snapshots:
                try:
                    doc = read_manifest(self.sink, ref.manifest)
                except Exception:
                    doc, unknown = None, True
                if doc is None:
                    missing.append(ref)
                    continue
                committed = str(doc.get("path") or ref.file)
                if committed != ref.file:  # another run's snapshot at the same point won
                    beaten.append(ref.file)  # ours by its token: no manifest can name it
                if ref.table not in head.snapshots or head.snapshots[ref.table].lsn < ref.lsn:
                    head.snapshots[ref.table] = replace(ref, file=committed)
            if beaten:
                lost.append(Pending("snapshot", [], beaten, p.run_id))
            rest = Pending(
                "snapshot",
                [r.manifest for r in missing],
                [r.file for r in missing],
                p.run_id,
                snapshots=missing,
                committing=p.committing,
            )
            if missing and (p.committing or unknown):
                kept.append(rest)
            elif missing:
                lost.append(rest)
            notes.append(
                f"snapshot at {format_lsn(p.snapshots[0].lsn) if p.snapshots else '?'} of "
                f"{p.who}: {len(p.snapshots) - len(missing)} of {len(p.snapshots)} table(s) "
                "committed"
                + (", the rest kept until their manifests appear" if rest in kept else "")
                + (", the rest deleted" if rest in lost else "")
            )
        return kept, lost

    def _delete(self, relpaths: list[str]) -> None:
        for rel in relpaths:
            try:
                self.sink.delete(rel)
            except Exception as e:
                raise CdcError(
                    f"deleting {rel}, left by a run that did not commit, failed (the next run "
                    f"tries again): {e}"
                ) from e

    def begin(self, head: Head, pending: Pending) -> None:
        """Record what is about to be published; nothing is published before this is durable."""
        head.pending = pending
        self.save(head)

    def committing(self, head: Head) -> None:
        """A snapshot's files are published and its manifests come next: say so in the head
        (compare-and-swap), after which a later run keeps them until the manifests appear."""
        assert head.pending is not None and head.pending.kind == "snapshot"
        head.pending.committing = True
        self.save(head)

    def catch_up(self, head: Head, position: int) -> list[str]:
        """Follow the chain of committed batches past what the head knows (a run that lost
        its lock may have committed one without recording it): from the last batch's end,
        or from the slot's `position` before any batch, `<start>.json` until one is missing."""
        notes = []
        start = head.committed.end_lsn if head.committed else position
        while True:
            rel = cdc_batch_manifest(self.source, self.slot, start)
            try:
                info, manifest = read_manifest_at(self.sink, rel)
            except Exception as e:
                raise CdcError(f"reading batch manifest {rel} failed: {e}") from e
            if manifest is None:
                if info is not None:
                    raise CdcError(f"batch manifest {rel} is not readable JSON")
                return notes
            if not head.adopt(rel, manifest):
                raise CdcError(f"batch manifest {rel} does not end after its start")
            notes.append(
                f"batch {rel} of run {str(manifest.get('run_id'))[:8]} is committed, though the "
                "journal head did not record it yet"
            )
            start = head.committed.end_lsn  # type: ignore[union-attr]

    def drop_losers(self, head: Head, manifest_rel: str) -> None:
        """This run committed `manifest_rel`: other runs' batches from the same position can
        never commit now, so their files go (best effort: a record whose delete fails stays,
        and the next run's `settle` deletes them)."""
        kept = []
        for p in head.unsettled:
            if p.kind == "batch" and p.manifests[0] == manifest_rel:
                try:
                    self._delete(p.files)
                    continue
                except CdcError:
                    pass
            kept.append(p)
        head.unsettled = kept


def rebuild_head(
    sink: Sink, source: str, slot: str, tables: list[QualifiedName]
) -> tuple[Head, list[str]]:
    """The head from listings, when `_head.json` is missing: the batch manifest starting last,
    each table's newest snapshot manifest, and every change file from the last batch's end on
    recorded as unsettled (nothing committed it yet, but a run that lost its lock may be about
    to: the batch that commits from there deletes them)."""
    head = Head(source, slot)
    journal = cdc_journal(source, slot)
    best: tuple[int, str] | None = None
    for rel in sink.list_files(journal):
        m = _BATCH_NAME.fullmatch(rel.rsplit("/", 1)[-1])
        if m and (best is None or int(m.group(1), 16) > best[0]):
            best = (int(m.group(1), 16), rel)
    notes = []
    if best is not None:
        manifest = read_manifest(sink, best[1])
        if manifest is None:
            raise CdcError(f"batch manifest {best[1]} is not readable JSON")
        head.committed = Committed.from_manifest(best[1], manifest)
        notes.append(f"{cdc_head(source, slot)} was missing: rebuilt from {best[1]}")
    last = head.committed.end_lsn if head.committed else -1
    uncommitted: dict[int, list[str]] = {}
    for table in tables:
        name = encode_segment(table.name)
        snap = re.compile(re.escape(name) + r"-snapshot-([0-9A-F]{16})\.json")
        change = re.compile(
            re.escape(name) + r"-([0-9A-F]{16})-[0-9A-F]{16}(?:-[0-9a-f]{8})?(?:-\d+)?\.csv.*"
        )
        snaps = {}
        for rel in sink.list_files(cdc_folder(source, table)):
            base = rel.rsplit("/", 1)[-1]
            if m := snap.fullmatch(base):
                snaps[int(m.group(1), 16)] = rel
            elif (m := change.fullmatch(base)) and int(m.group(1), 16) >= last:
                uncommitted.setdefault(int(m.group(1), 16), []).append(rel)
        if snaps:
            lsn = max(snaps)
            doc = read_manifest(sink, snaps[lsn])
            if doc is not None:
                head.snapshots[table] = SnapshotRef(table, lsn, snaps[lsn], doc["path"])
    for start, files in sorted(uncommitted.items()):
        head.unsettled.append(
            Pending("batch", [cdc_batch_manifest(source, slot, start)], sorted(files), "")
        )
        notes.append(
            f"{len(files)} change file(s) from {format_lsn(start)} are not committed by any batch "
            "manifest: kept until a batch from there commits"
        )
    return head, notes


@dataclass
class TableChanges:
    """One table's share of a batch (or of a run: `merge`)."""

    table: QualifiedName
    ops: Counter[str] = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    first_commit_lsn: int | None = None
    last_commit_lsn: int | None = None
    first_commit_time: int | None = None  # PostgreSQL microseconds since 2000-01-01
    last_commit_time: int | None = None
    raw_bytes: int = 0
    compressed_bytes: int = 0
    columns: list[dict[str, str]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.ops.values())

    def add(self, f: PartStats, path: str, uri: str, columns: list[dict[str, str]]) -> None:
        self.ops.update(f.ops)
        self.files.append(path)
        self.uris.append(uri)
        self.raw_bytes += f.raw_bytes
        self.compressed_bytes += f.compressed_bytes
        self.columns = columns
        if f.first_commit_lsn is not None and (
            self.first_commit_lsn is None or f.first_commit_lsn < self.first_commit_lsn
        ):
            self.first_commit_lsn, self.first_commit_time = f.first_commit_lsn, f.first_commit_time
        if f.last_commit_lsn is not None and (
            self.last_commit_lsn is None or f.last_commit_lsn > self.last_commit_lsn
        ):
            self.last_commit_lsn, self.last_commit_time = f.last_commit_lsn, f.last_commit_time

    def merge(self, other: "TableChanges") -> None:
        self.ops.update(other.ops)
        self.files += other.files
        self.uris += other.uris
        self.raw_bytes += other.raw_bytes
        self.compressed_bytes += other.compressed_bytes
        self.columns = other.columns or self.columns
        if other.first_commit_lsn is not None and self.first_commit_lsn is None:
            self.first_commit_lsn = other.first_commit_lsn
            self.first_commit_time = other.first_commit_time
        if other.last_commit_lsn is not None:
            self.last_commit_lsn = other.last_commit_lsn
            self.last_commit_time = other.last_commit_time


def _time(pg_us: int | None) -> str | None:
    return None if pg_us is None else commit_datetime(pg_us).isoformat()


def _hex(lsn: int | None) -> str | None:
    return None if lsn is None else lsn_hex(lsn)


def batch_manifest(
    *,
    source: str,
    batch: Batch,
    tables: dict[QualifiedName, int],
    files: list[dict[str, Any]],
    codec: Codec,
    level: int,
    run_id: str,
) -> dict[str, Any]:
    """The commit point's content: what a reader needs to trust and replay the batch."""
    assert batch.end_lsn is not None
    per_table: dict[QualifiedName, dict[str, Any]] = {
        t: {
            "table": table_display(t.schema, t.name),
            "schema_name": t.schema,
            "table_name": t.name,
            "snapshot_lsn": lsn_hex(lsn),
            "changes": {},
            "files": [],
        }
        for t, lsn in sorted(tables.items())
    }
    for f in files:
        entry = per_table[QualifiedName(f["schema_name"], f["table_name"])]
        entry["files"].append(f["path"])
        for op, n in f["changes"].items():
            entry["changes"][op] = entry["changes"].get(op, 0) + n
    return {
        "version": MANIFEST_VERSION,
        "pg_assets_version": __version__,
        "kind": "cdc_batch",
        "source": source,
        "slot": batch.slot,
        "publication": batch.publication,
        "start_lsn": lsn_hex(batch.start_lsn),
        "end_lsn": lsn_hex(batch.end_lsn),
        "range": "transactions whose commit record lies in [start_lsn, end_lsn): the slot's "
        "position before the batch, and the end of its last commit record",
        "first_commit_lsn": _hex(batch.first_commit_lsn),
        "last_commit_lsn": _hex(batch.last_commit_lsn),
        "first_commit_time": _time(batch.first_commit_time),
        "last_commit_time": _time(batch.last_commit_time),
        "transactions": batch.transactions,
        "changes": batch.changes,
        "skipped_changes": batch.skipped,
        "heartbeats": batch.heartbeats,
        "tables": list(per_table.values()),
        "files": files,
        "codec": codec.name,
        "level": level,
        "format": "csv, header (COPY's dialect); columns _op, _commit_lsn, _lsn, _xid, "
        "_commit_time, _seq, <table columns>, _unchanged, _old_<key columns>",
        "replay": "per table: its snapshot, then the change rows in (_commit_lsn, _seq) order",
        "session": dict(PINNED_SETTINGS),
        "committed_at": dt.datetime.now(dt.UTC).isoformat(),
        "seconds": round(batch.seconds, 3),
        "run_id": run_id,
    }


def file_entry(
    f: PartStats, path: str, published: Published, types: dict[tuple[int, int], str]
) -> dict[str, Any]:
    return {
        "table": str(f.table),
        "schema_name": f.table.schema,
        "table_name": f.table.name,
        "part": f.part,
        "path": path,
        "file": path.rsplit("/", 1)[-1],
        "uri": published.uri,
        "etag": published.etag,
        "rows": f.rows,
        "changes": dict(sorted(f.ops.items())),
        "header": f.header,
        "columns": [
            {"name": c.name, "type": types[(c.type_oid, c.type_modifier)], "key": c.is_key}
            for c in f.columns
        ],
        "first_commit_lsn": _hex(f.first_commit_lsn),
        "last_commit_lsn": _hex(f.last_commit_lsn),
        "first_commit_time": _time(f.first_commit_time),
        "last_commit_time": _time(f.last_commit_time),
        "raw_bytes": f.raw_bytes,
        "compressed_bytes": f.compressed_bytes,
        "sha256": f.sha256,
    }


def manifest_path(source: str, batch: Batch) -> str:
    return cdc_batch_manifest(source, batch.slot, batch.start_lsn)


def table_of(key: TableKey) -> QualifiedName:
    return QualifiedName(key.schema, key.name)

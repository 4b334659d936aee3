"""Exactly once in Bronze: how a batch of changes is published, committed and consumed.

A batch covers the slot's stream from its position S (confirmed_flush_lsn when read) to E, the
end of the last commit record read: every transaction that committed in between, whole. Its
files and its manifest are named after (S, E), and the manifest is the commit point:

    1. read (peek: the slot does not move) into staging files           crash: nothing visible
    2. record the batch as pending in `_cdc/<slot>/_head.json`           crash: nothing visible
    3. publish each change file under its final name                     crash: orphans, listed
    4. publish `_cdc/<slot>/<S>-<E>.json`        ← THE COMMIT POINT        in the pending record
    5. advance the slot to E (pg_replication_slot_advance)               crash: lake ahead
    6. the head records the batch as committed (lazily: with the next pending record)

On the next run (`Journal.load`): a pending batch whose manifest exists is committed, one
without is rolled back (its files deleted); then, if the lake's last batch ends beyond the slot
(a crash between 4 and 5, or a server crash that forgot an advance), the slot is advanced
there before anything is read. The slot never moves before the lake holds the changes, and
the lake never commits a range twice: the slot's position is the start of the next batch, and
a rerun of a batch that was not committed reads the same transactions again.

The head is a cache, not a commit point: it saves listing the journal and the table folders,
which grow forever, on every run. A missing head is rebuilt from listings (`rebuild_head`).
"""

import datetime as dt
import json
import re
from collections import Counter
from dataclasses import dataclass, field
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
from pg_assets.core.publish import holds
from pg_assets.sinks.base import Published, Sink

HEAD_VERSION = 1
MANIFEST_VERSION = 1
_BATCH_NAME = re.compile(r"([0-9A-F]{16})-([0-9A-F]{16})\.json")


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
        return cls(
            d["manifest"],
            int(d["start_lsn"], 16),
            int(d["end_lsn"], 16),
            {
                QualifiedName(t["schema_name"], t["table_name"]): int(t["snapshot_lsn"], 16)
                for t in d["tables"]
            },
        )

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

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "manifests": self.manifests,
            "files": self.files,
            "run_id": self.run_id,
            "batch": self.batch.to_json() if self.batch else None,
            "snapshots": [s.to_json() for s in self.snapshots],
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
        )


@dataclass
class Head:
    source: str
    slot: str
    committed: Committed | None = None
    pending: Pending | None = None
    snapshots: dict[QualifiedName, SnapshotRef] = field(default_factory=dict)

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
        )


def read_json(sink: Sink, relpath: str) -> dict[str, Any] | None:
    if sink.stat(relpath) is None:
        return None
    try:
        doc = json.loads(sink.read_bytes(relpath))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


class Journal:
    """The lake side of one source's slot: the head, the pending record, batch manifests."""

    def __init__(self, sink: Sink, source: str, slot: str, run_id: str) -> None:
        self.sink, self.source, self.slot, self.run_id = sink, source, slot, run_id
        self.head_path = cdc_head(source, slot)

    def save(self, head: Head) -> None:
        body = json.dumps(head.to_json(), indent=2).encode()
        try:
            self.sink.write_bytes(self.run_id, self.head_path, body, "application/json")
        except Exception as e:
            if not holds(self.sink, self.head_path, body):
                raise CdcError(f"writing {self.head_path} failed: {e}") from e

    def load(self, tables: list[QualifiedName]) -> tuple[Head, list[str]]:
        """The head with its pending record resolved (committed, or rolled back and its
        files deleted). Returns the head and a line per thing recovered, for the run's log."""
        doc = read_json(self.sink, self.head_path)
        notes: list[str] = []
        if doc is None:
            head, notes = rebuild_head(self.sink, self.source, self.slot, tables)
        else:
            head = Head.from_json(doc)
        if head.pending is not None:
            notes.append(self._resolve(head, head.pending))
            head.pending = None
            self.save(head)
        return head, notes

    def _resolve(self, head: Head, p: Pending) -> str:
        present = {m for m in p.manifests if read_json(self.sink, m) is not None}
        if p.kind == "batch":
            if present:
                assert p.batch is not None
                head.committed = p.batch
                return (
                    f"batch {p.manifests[0]} of run {p.run_id[:8]} was committed; its slot "
                    "advance is checked next"
                )
            self._delete(p.files)
            return (
                f"batch {p.manifests[0]} of run {p.run_id[:8]} was not committed: deleted its "
                f"{len(p.files)} published or partly published file(s)"
            )
        kept = []
        for ref in p.snapshots:
            if ref.manifest in present:
                head.snapshots[ref.table] = ref
                kept.append(ref)
            else:
                self._delete([ref.file])
        return (
            f"snapshot at {format_lsn(p.snapshots[0].lsn) if p.snapshots else '?'} of run "
            f"{p.run_id[:8]}: {len(kept)} of {len(p.snapshots)} table(s) committed, the rest "
            "deleted"
        )

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


def rebuild_head(
    sink: Sink, source: str, slot: str, tables: list[QualifiedName]
) -> tuple[Head, list[str]]:
    """The head from listings, when `_head.json` is missing: the batch manifest ending last,
    each table's newest snapshot manifest, and every change file after the last batch deleted
    (nothing committed them)."""
    head = Head(source, slot)
    journal = cdc_journal(source, slot)
    best: tuple[int, str] | None = None
    for rel in sink.list_files(journal):
        m = _BATCH_NAME.fullmatch(rel.rsplit("/", 1)[-1])
        if m and (best is None or int(m.group(2), 16) > best[0]):
            best = (int(m.group(2), 16), rel)
    notes = []
    if best is not None:
        manifest = read_json(sink, best[1])
        if manifest is None:
            raise CdcError(f"batch manifest {best[1]} is not readable JSON")
        head.committed = Committed.from_manifest(best[1], manifest)
        notes.append(f"{cdc_head(source, slot)} was missing: rebuilt from {best[1]}")
    last = head.committed.end_lsn if head.committed else -1
    for table in tables:
        name = encode_segment(table.name)
        snap = re.compile(re.escape(name) + r"-snapshot-([0-9A-F]{16})\.json")
        change = re.compile(re.escape(name) + r"-([0-9A-F]{16})-([0-9A-F]{16})(?:-\d+)?\.csv.*")
        files = sink.list_files(cdc_folder(source, table))
        snaps = {}
        for rel in files:
            base = rel.rsplit("/", 1)[-1]
            if m := snap.fullmatch(base):
                snaps[int(m.group(1), 16)] = rel
            elif (m := change.fullmatch(base)) and int(m.group(1), 16) >= last:
                sink.delete(rel)
                notes.append(f"deleted {rel}: no batch manifest commits it")
        if snaps:
            lsn = max(snaps)
            doc = read_json(sink, snaps[lsn])
            if doc is not None:
                head.snapshots[table] = SnapshotRef(table, lsn, snaps[lsn], doc["path"])
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
    assert batch.end_lsn is not None
    return cdc_batch_manifest(source, batch.slot, batch.start_lsn, batch.end_lsn)


def table_of(key: TableKey) -> QualifiedName:
    return QualifiedName(key.schema, key.name)

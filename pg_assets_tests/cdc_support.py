"""Helpers shared by the CDC tests: waiting for WAL flush, in-memory change files, raw CSV
fields, replay."""

import hashlib
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.changes import TableKey
from pg_assets.core.cdc.reader import PINNED_SETTINGS, Batch, read_batch
from pg_assets.core.compression import get_codec
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import cdc_folder, cdc_journal
from pg_assets.sinks.base import Sink


def wait_flushed(conn: psycopg.Connection, timeout: float = 20) -> None:
    """Wait until everything this server has logged so far is flushed, hence decodable.

    The embedded server runs with synchronous_commit = off: COMMIT returns before its WAL is
    flushed, and logical decoding reads only up to the flush position (the WAL writer gets
    there within wal_writer_delay). Poll for it instead of sleeping a guessed time."""
    (target,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()  # type: ignore[misc]
    deadline = time.monotonic() + timeout
    while True:
        (ok,) = conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", [target]).fetchone()  # type: ignore[misc]
        if ok:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"WAL not flushed up to {target} within {timeout}s")
        time.sleep(0.02)


@dataclass
class MemoryFiles:
    """An `open_part` that keeps each change file's compressed blocks in memory."""

    codec: str = "gzip"
    files: dict[tuple[TableKey, int], bytearray] = field(default_factory=dict)

    def open_part(self, table: TableKey, part: int) -> "MemoryFiles._File":
        buf = self.files[(table, part)] = bytearray()
        return MemoryFiles._File(buf)

    def compressor(self):
        return get_codec(self.codec).compressor(1)

    def data(self, schema: str, name: str, part: int = 0) -> bytes:
        return get_codec(self.codec).decompress(bytes(self.files[(TableKey(schema, name), part)]))

    @dataclass
    class _File:
        buf: bytearray

        def write(self, block: bytes, /) -> None:
            self.buf += block


def read(conn: psycopg.Connection, slot: str, pub: str, **kwargs) -> tuple[Batch, MemoryFiles]:
    files = MemoryFiles()
    batch = read_batch(conn, slot, pub, files.open_part, files.compressor, **kwargs)
    return batch, files


def raw_records(data: bytes) -> list[list[bytes]]:
    """Split CSV into records of raw field bytes, quotes kept exactly as written, so that
    comparing fields compares COPY's quoting too."""
    records: list[list[bytes]] = []
    fields: list[bytes] = []
    start = i = 0
    quoted = False
    n = len(data)
    while i < n:
        c = data[i]
        if quoted:
            if c == 0x22:
                if i + 1 < n and data[i + 1] == 0x22:
                    i += 2
                    continue
                quoted = False
        elif c == 0x22:
            quoted = True
        elif c == 0x2C:
            fields.append(data[start:i])
            start = i + 1
        elif c == 0x0A:
            fields.append(data[start:i])
            records.append(fields)
            fields = []
            start = i + 1
        i += 1
    assert start == n and not quoted, "CSV does not end with a complete record"
    return records


def unquote(field_: bytes) -> bytes | None:
    if field_ == b"":
        return None
    if field_.startswith(b'"'):
        return field_[1:-1].replace(b'""', b'"')
    return field_


def pinned_copy(conn: psycopg.Connection, query: sql.Composable) -> bytes:
    """COPY (query) TO STDOUT (FORMAT csv, HEADER) under the pinned session settings."""
    out = bytearray()
    with conn.transaction():
        for k, v in PINNED_SETTINGS.items():
            conn.execute("SELECT set_config(%s, %s, true)", [k, v])
        with (
            conn.cursor() as cur,
            cur.copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT csv, HEADER)").format(query)) as cp,
        ):
            for chunk in cp:
                out += chunk
    return bytes(out)


def replay(
    snapshot: bytes, changes: list[bytes], key: list[str]
) -> tuple[list[bytes], dict[tuple, list[bytes]]]:
    """Apply change files (raw CSV) onto a snapshot (raw CSV, table columns only) by key, in
    (_commit_lsn, _seq) order, as a Bronze reader would. Returns header and rows by key."""
    snap = raw_records(snapshot)
    header = snap[0]
    names = [h.decode() for h in header]
    kidx = [names.index(k) for k in key]
    table: dict[tuple, list[bytes]] = {tuple(r[i] for i in kidx): r for r in snap[1:]}
    rows: list[tuple[bytes, int, list[bytes]]] = []
    for data in changes:
        recs = raw_records(data)
        h = [x.decode() for x in recs[0]]
        assert h[6 : 6 + len(names)] == names, (h, names)
        for r in recs[1:]:
            rows.append((r[1], int(r[5]), r))
    rows.sort(key=lambda x: (x[0], x[1]))
    for _, _, r in rows:
        op = r[0]
        values = r[6 : 6 + len(names)]
        k = tuple(values[i] for i in kidx)
        # strict: an insert of a key present, or an update/delete of a key absent, means the
        # snapshot and the changes overlap or have a gap
        if op == b"I":
            assert k not in table, f"insert of existing key {k}"
            table[k] = values
        elif op == b"U":
            old = r[7 + len(names) :]
            before = table.pop(tuple(old[: len(kidx)]) if any(old) else k)
            unchanged = r[6 + len(names)]
            if unchanged:
                for name in unquote(unchanged).decode().strip("{}").split(","):  # type: ignore[union-attr]
                    values[names.index(name)] = before[names.index(name)]
            assert k not in table, f"update onto existing key {k}"
            table[k] = values
        elif op == b"D":
            del table[k]
        elif op == b"T":
            table.clear()
    return header, table


@pytest.fixture
def cdc_env(db: psycopg.Connection, cdc_names) -> Iterator[tuple[str, str, str]]:
    """(schema, slot, publication): a fresh schema for the test's tables, dropped after."""
    slot, pub = cdc_names()
    schema = f"cdc_{slot}"
    db.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield schema, slot, pub
    db.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def cdc_names(pg_conninfo: str) -> Iterator[Callable[[], tuple[str, str]]]:
    """Fresh (slot, publication) names; whatever was created under them is dropped after."""
    made: list[tuple[str, str]] = []

    def make() -> tuple[str, str]:
        tag = uuid.uuid4().hex[:8]
        made.append((f"t_{tag}", f"t_{tag}"))
        return made[-1]

    yield make
    for slot, pub in made:
        drop_slot_and_publication(pg_conninfo, slot, pub)


def drop_slot_and_publication(conninfo: str, slot: str, pub: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as c:
        for _ in range(50):  # a just-closed reader may still hold the slot for a moment
            try:
                cdc_slot.drop_slot(c, slot)
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
        cdc_slot.drop_publication(c, pub)


def lose_slot(db: psycopg.Connection, table: sql.Composable) -> None:
    """Make PostgreSQL invalidate the slot: cap its WAL at 1 MB, write past it (updates of
    `table`, which has an int column `n`), checkpoint. Changes a server-wide setting."""
    db.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    try:
        db.execute("SELECT pg_reload_conf()")
        for _ in range(100):
            if db.execute("SHOW max_slot_wal_keep_size").fetchone()[0] == "1MB":  # type: ignore[index]
                break
            time.sleep(0.05)
        for _ in range(4):
            db.execute(sql.SQL("UPDATE {} SET n = n + 1").format(table))
            db.execute("SELECT pg_switch_wal()")
        db.execute("CHECKPOINT")
    finally:
        db.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        db.execute("SELECT pg_reload_conf()")


class Writer(threading.Thread):
    """Small transactions of inserts, updates (some changing the key) and deletes, each
    spread over a few statements so some are always in progress."""

    def __init__(self, conninfo: str, table: sql.Composable, seed: int) -> None:
        super().__init__(daemon=True)
        self.conninfo, self.table = conninfo, table
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as c:
                next_id = 1_000_000
                while not self.stop.is_set():
                    with c.transaction():
                        for _ in range(self.rng.randint(1, 4)):
                            k = self.rng.randint(1, 3000)
                            op = self.rng.random()
                            if op < 0.4:
                                next_id += 1
                                c.execute(
                                    sql.SQL("INSERT INTO {} VALUES (%s, md5(%s::text), %s)").format(
                                        self.table
                                    ),
                                    [next_id, next_id, k],
                                )
                            elif op < 0.75:
                                c.execute(
                                    sql.SQL("UPDATE {} SET v = v || 'u', n = n + 1 WHERE id = %s")
                                    .format(self.table), [k],
                                )  # fmt: skip
                            elif op < 0.85:
                                next_id += 1
                                c.execute(
                                    sql.SQL("UPDATE {} SET id = %s WHERE id = %s").format(
                                        self.table
                                    ),
                                    [next_id, k],
                                )
                            else:
                                c.execute(
                                    sql.SQL("DELETE FROM {} WHERE id = %s").format(self.table), [k]
                                )
                            time.sleep(0.001)
                    self.transactions += 1
        except BaseException as e:  # surfaced by finish()
            self.error = e

    def finish(self) -> int:
        self.stop.set()
        self.join(timeout=30)
        assert not self.is_alive(), "writer did not stop"
        if self.error is not None:
            raise self.error
        return self.transactions


@dataclass
class BronzeCdc:
    """One table's CDC data as a reader trusting manifests finds it."""

    snapshot: bytes  # the newest snapshot, decompressed
    snapshot_manifest: dict
    changes: list[bytes]  # its committed change files, decompressed, in LSN order
    manifests: list[dict]  # every batch manifest of the slot, in LSN order


_BATCH = re.compile(r"[0-9A-F]{16}\.json")


def read_bronze_cdc(
    sink: Sink, source: str, slot: str, table: QualifiedName, codec: str = "gzip"
) -> BronzeCdc:
    """Read through the manifests, checking what every ended run must leave: a contiguous chain
    of batch manifests, each file's size and sha256 as its manifest says, and no file in the
    table's folder that no manifest commits (no orphans)."""
    names = sorted(
        r for r in sink.list_files(cdc_journal(source, slot)) if _BATCH.fullmatch(r.split("/")[-1])
    )
    manifests = [json.loads(sink.read_bytes(r)) for r in names]
    folder = set(sink.list_files(cdc_folder(source, table)))
    snaps = sorted(r for r in folder if "-snapshot-" in r and r.endswith(".json"))
    assert snaps, f"no snapshot of {table} in {sorted(folder)}"
    referenced = set(snaps)
    for rel in snaps:
        referenced.add(json.loads(sink.read_bytes(rel))["path"])
    snap_m = json.loads(sink.read_bytes(snaps[-1]))
    since = [m for m in manifests if m["end_lsn"] > snap_m["lsn"]]  # one chain since then
    for a, b in zip(since, since[1:], strict=False):
        assert b["start_lsn"] == a["end_lsn"], (a["end_lsn"], b["start_lsn"])
    decompress = get_codec(codec).decompress

    def verified(rel: str, entry: dict) -> bytes:
        data = sink.read_bytes(rel)
        assert len(data) == entry["compressed_bytes"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        return decompress(data)

    snapshot = verified(snap_m["path"], snap_m)
    floor = snap_m["lsn"].encode()
    changes = []
    for m in manifests:
        for f in m["files"]:
            if (f["schema_name"], f["table_name"]) == (table.schema, table.name):
                referenced.add(f["path"])
                records = raw_records(verified(f["path"], f))
                rows = [r for r in records[1:] if r[1] >= floor]  # the documented replay rule
                if rows:
                    changes.append(b"".join(b",".join(r) + b"\n" for r in [records[0], *rows]))
    assert folder == referenced, f"orphans: {sorted(folder - referenced)}"
    return BronzeCdc(snapshot, snap_m, changes, manifests)


def change_rows(changes: list[bytes]) -> list[list[bytes]]:
    """Every change row (header dropped), raw fields."""
    return [r for data in changes for r in raw_records(data)[1:]]


def assert_exactly_once(changes: list[bytes], witness: dict[int, int]) -> None:
    """Each committed change exactly once: no (_commit_lsn, _seq) twice, and per transaction
    as many rows as an independent decoder (`witness`, xid → changes) saw."""
    rows = change_rows(changes)
    keys = [(r[1], r[5]) for r in rows]
    dupes = {k for k in keys if keys.count(k) > 1} if len(keys) != len(set(keys)) else set()
    assert not dupes, f"changes landed twice: {sorted(dupes)[:5]}"
    per_xid: dict[int, int] = {}
    for r in rows:
        per_xid[int(r[3])] = per_xid.get(int(r[3]), 0) + 1
    assert per_xid == witness


@dataclass
class Witness:
    """A test_decoding slot created next to ours: its own view of which transactions changed
    a table, and how many rows each, to hold Bronze against."""

    conninfo: str
    slot: str

    @classmethod
    def create(cls, conn: psycopg.Connection, slot: str) -> "Witness":
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [slot])
        return cls(conn.info.dsn, slot)

    def counts(self, conn: psycopg.Connection, *tables: QualifiedName) -> dict[int, int]:
        """xid → rows of `tables` (name a partitioned table's partitions: test_decoding
        reports changes where they are stored)."""
        wait_flushed(conn)
        prefix = tuple(f"table {t.schema}.{t.name}: " for t in tables)
        out: dict[int, int] = {}
        xid = 0
        for (data,) in conn.execute(
            "SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL, 'include-xids', '1')",
            [self.slot],
        ):
            if data.startswith("BEGIN "):
                xid = int(data.split()[1])
            elif data.startswith(prefix):
                out[xid] = out.get(xid, 0) + 1
        return out

    def drop(self, conn: psycopg.Connection) -> None:
        conn.execute("SELECT pg_drop_replication_slot(%s)", [self.slot])

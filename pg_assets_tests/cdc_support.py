"""Helpers shared by the CDC tests: waiting for WAL flush, in-memory change files, raw CSV
fields, replay."""

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
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        for slot, pub in made:
            for _ in range(50):  # a just-closed reader may still hold the slot for a moment
                try:
                    cdc_slot.drop_slot(c, slot)
                    break
                except psycopg.errors.ObjectInUse:
                    time.sleep(0.1)
            cdc_slot.drop_publication(c, pub)

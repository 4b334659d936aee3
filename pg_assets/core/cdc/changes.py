"""Change files: one CSV per table (per schema version) per batch, in COPY's CSV dialect.

A change file is what `COPY ... TO STDOUT (FORMAT csv, HEADER)` would write for the changed
rows, with bookkeeping columns around the table's own:

    _op, _commit_lsn, _lsn, _xid, _commit_time, _seq, <table columns…>, _unchanged, _old_<key>…

- `_op`: I insert, U update, D delete, T truncate.
- `_commit_lsn`: the transaction's commit record; `_lsn`: the change's own record. Both as 16
  upper-case hex digits (`pg_assets.core.cdc.lsn.lsn_hex`) so they sort as text. A reader
  replays a table by applying rows in (`_commit_lsn`, `_seq`) order.
- `_xid`: the transaction id; `_commit_time`: its commit time in PostgreSQL's own text form
  for timestamptz under the pinned session (`2026-11-27 11:25:05.47796+00`).
- `_seq`: 1, 2, … within the transaction, across all its tables.
- table columns: the new row (I, U), the old key (D: non-key columns empty) or the whole old
  row under REPLICA IDENTITY FULL; all empty for T.
- `_unchanged`: the TOASTed columns an update did not change and PostgreSQL did not log, as a
  PostgreSQL text array (`{a,"my col"}`), their table columns left empty; empty when none.
- `_old_<col>` per replica-identity column: the old key of an update that changed it (or the
  old row under REPLICA IDENTITY FULL, where PostgreSQL sends it on every update); empty
  otherwise.

Table values are PostgreSQL's text output as pgoutput sent it — the same function and (with
the session pinned, see `reader.PINNED_SETTINGS`) the same bytes COPY writes — quoted exactly
as COPY's CSV does: NULL as an unquoted empty field, '' as `""`, quotes doubled, a field
quoted when it holds a comma, a quote, CR or LF, and (one-column files only) `\\.`.

Nothing is decoded to Python strings: values stay bytes from the wire to the compressor.
"""

import re
import struct
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pg_assets.core.cdc.lsn import lsn_hex
from pg_assets.core.cdc.pgoutput import (
    BINARY_VALUE,
    Begin,
    Column,
    Commit,
    ProtocolError,
    Relation,
    Truncate,
    commit_datetime,
    decode,
)
from pg_assets.core.compression import Compressor
from pg_assets.core.copy_stream import BlockCutter, BlockWriter
from pg_assets.core.identifiers import QualifiedName

META_COLUMNS = ("_op", "_commit_lsn", "_lsn", "_xid", "_commit_time", "_seq")
UNCHANGED_COLUMN = "_unchanged"
OLD_PREFIX = "_old_"
_SKIP_ALL = 1 << 64  # above every LSN: a floor that keeps nothing
GATHER_BYTES = 256 << 10

_NEEDS_QUOTE = re.compile(rb'[",\r\n]')
# array_out quotes an element that is empty, is NULL (any case), or holds one of {}",\ or
# PostgreSQL's array whitespace (ASCII only: a no-break space is not quoted)
_ARRAY_NEEDS_QUOTE = re.compile(r'[{}",\\ \t\n\r\v\f]|^$|^[Nn][Uu][Ll][Ll]$')


class ChangeFileError(ValueError):
    """A change file cannot be written as specified (names a table and column)."""


def csv_field(value: bytes | None) -> bytes:
    """One field as COPY (FORMAT csv) writes it, for a multi-column row."""
    if value is None:
        return b""
    if not value:
        return b'""'
    if _NEEDS_QUOTE.search(value) is not None:
        return b'"' + value.replace(b'"', b'""') + b'"'
    return value


def csv_line(values: Sequence[bytes | None]) -> bytes:
    """One row as COPY (FORMAT csv) writes it, newline included."""
    if len(values) == 1 and values[0] == b"\\.":
        return b'"\\."\n'  # alone on a line it would read as COPY's end-of-data marker
    return b",".join([csv_field(v) for v in values]) + b"\n"


def text_array(names: Sequence[str]) -> str:
    """A PostgreSQL text[] literal as array_out prints it (`{a,"my col"}`)."""

    def element(name: str) -> str:
        if _ARRAY_NEEDS_QUOTE.search(name):
            return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return name

    return "{" + ",".join(element(n) for n in names) + "}"


def pg_timestamptz_text(pg_microseconds: int) -> str:
    """timestamptz output under DateStyle=ISO, TimeZone=UTC: fraction without trailing zeros."""
    t = commit_datetime(pg_microseconds)
    text = f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    if t.microsecond:
        text += f".{t.microsecond:06d}".rstrip("0")
    return text + "+00"


def change_columns(columns: Sequence[Column]) -> list[str]:
    """The header of a change file for a relation with these columns."""
    names = [c.name for c in columns]
    keys = [OLD_PREFIX + c.name for c in columns if c.is_key]
    return [*META_COLUMNS, *names, UNCHANGED_COLUMN, *keys]


@dataclass(frozen=True)
class TableKey:
    """A table as the change stream names it (schema '' would be pg_catalog; never ours)."""

    schema: str
    name: str

    def __str__(self) -> str:
        return table_display(self.schema, self.name)


def table_display(schema: str, name: str) -> str:
    """`schema.table` quoted as PostgreSQL would for a human."""
    return QualifiedName(schema, name).display


@dataclass
class PartStats:
    """One change file: what a manifest says about it."""

    table: TableKey
    part: int  # 0 for the first file of the table in the batch, 1 after a schema change, …
    columns: tuple[Column, ...]
    header: list[str]
    rows: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    first_commit_lsn: int | None = None
    last_commit_lsn: int | None = None
    first_commit_time: int | None = None
    last_commit_time: int | None = None
    raw_bytes: int = 0
    compressed_bytes: int = 0
    sha256: str = ""


def _signature(columns: Sequence[Column]) -> tuple[tuple[str, int, int, bool], ...]:
    return tuple((c.name, c.type_oid, c.type_modifier, c.is_key) for c in columns)


_unpack_H = struct.Struct(">H").unpack_from
_unpack_i = struct.Struct(">i").unpack_from
_unpack_I = struct.Struct(">I").unpack_from
_EMPTY = b'""'


# Built-in types whose text output (under the pinned session) never holds a comma, quote, CR
# or LF, so their values skip the quoting check: bool, int2/4/8, oid, xid, xid8, float4/8,
# numeric, date, time, timetz, timestamp, timestamptz, interval, uuid, pg_lsn.
NEVER_QUOTED_TYPES = frozenset(
    {16, 20, 21, 23, 26, 28, 5069, 700, 701, 1700, 1082, 1083, 1266, 1114, 1184, 1186, 2950, 3220}
)


def csv_tuple(
    data: bytes, pos: int, plain: Sequence[bool] = ()
) -> tuple[list[bytes], int, list[int] | None]:
    """pgoutput TupleData at `pos`, straight to CSV fields: the hot path of a batch.

    Equivalent to `[csv_field(v) for v in pgoutput.read_tuple(...)]` (the tests hold it to
    that), fused so each value is sliced and quoted once with no intermediate objects.
    `plain[i]` true means column i's type never needs quoting (NEVER_QUOTED_TYPES): no check.
    Returns the fields, the position after the tuple, and the indexes of unchanged-TOAST
    columns (None when there are none), whose fields are left empty."""
    (n,) = _unpack_H(data, pos)
    pos += 2
    fields: list[bytes] = []
    append = fields.append
    search = _NEEDS_QUOTE.search
    unchanged: list[int] | None = None
    nplain = len(plain)
    for i in range(n):
        kind = data[pos]
        if kind == 0x74:  # 't'
            (size,) = _unpack_i(data, pos + 1)
            pos += 5
            if size > 0:
                end = pos + size
                value = data[pos:end]
                pos = end
                if (i < nplain and plain[i]) or search(value) is None:
                    append(value)
                else:
                    append(b'"' + value.replace(b'"', b'""') + b'"')
            elif size == 0:
                append(_EMPTY)
            else:
                raise ProtocolError(f"negative value length {size}")
        elif kind == 0x6E:  # 'n'
            append(b"")
            pos += 1
        elif kind == 0x75:  # 'u'
            append(b"")
            pos += 1
            if unchanged is None:
                unchanged = []
            unchanged.append(i)
        elif kind == 0x62:  # 'b'
            raise ProtocolError(BINARY_VALUE)
        else:
            raise ProtocolError(f"unknown tuple value kind {chr(kind)!r}")
    if pos > len(data):
        raise ProtocolError("tuple data overruns the message")
    return fields, pos, unchanged


class _Part:
    """An open change file: formats rows, gathers them, hands chunks to its output."""

    def __init__(self, stats: PartStats, out: BlockCutter, gather_bytes: int) -> None:
        self.stats = stats
        self.out = out
        self.gather_bytes = gather_bytes
        self.signature = _signature(stats.columns)
        self.ncols = len(stats.columns)
        self.key_idx = [i for i, c in enumerate(stats.columns) if c.is_key]
        self.plain = tuple(c.type_oid in NEVER_QUOTED_TYPES for c in stats.columns)
        self.empty_tail = b"," + b"," * len(self.key_idx) + b"\n"  # _unchanged, _old_*
        self.names = [c.name for c in stats.columns]
        self.counts = {"I": 0, "U": 0, "D": 0, "T": 0}
        self.buf = bytearray(csv_line([h.encode() for h in stats.header]))

    def add(
        self,
        op: str,
        prefix: bytes,
        fields: list[bytes],
        unchanged: list[int] | None,
        old: list[bytes] | None,
    ) -> None:
        """`prefix`: the meta fields through the comma after `_seq`; `fields`: CSV-ready."""
        if len(fields) != self.ncols:
            raise ProtocolError(
                f"table {self.stats.table}: {len(fields)} values for {self.ncols} columns"
            )
        if unchanged is None and old is None:
            line = prefix + b",".join(fields) + self.empty_tail
        else:
            tail = b","
            if unchanged is not None:
                tail += csv_field(text_array([self.names[i] for i in unchanged]).encode())
            if old is None:
                tail += self.empty_tail[1:]
            else:
                tail += b"".join([b"," + old[i] for i in self.key_idx]) + b"\n"
            line = prefix + b",".join(fields) + tail
        buf = self.buf
        buf += line
        self.counts[op] += 1
        if len(buf) >= self.gather_bytes:
            self.out.write(buf)
            self.buf = bytearray()

    def close(self) -> PartStats:
        if self.buf:
            self.out.write(self.buf)
            self.buf = bytearray()
        self.out.close()
        stats = self.stats
        stats.ops = Counter({k: v for k, v in self.counts.items() if v})
        stats.rows = sum(self.counts.values())
        stats.raw_bytes = self.out.raw_bytes
        stats.compressed_bytes = self.out.compressed_bytes
        stats.sha256 = self.out.sha256
        return stats


OpenPart = Callable[[TableKey, int], BlockWriter]
"""Called with (table, part) when a change file is about to receive its first row: returns
where its compressed blocks go (in pg_assets, a sink staging file)."""


class ChangeWriter:
    """Turns one batch's messages into change files, one per table and schema version.

    Feed it the stream in order: `relation(msg)`, `begin(msg)`, `data(lsn, raw)` for each raw
    Insert/Update/Delete/Truncate message, `commit(msg)`; then `finish()` flushes every file
    and returns their stats (in the order they were opened). Data messages are formatted from
    their raw bytes (`csv_tuple`), the hot path. A file is opened only when its first row
    arrives, so a table without changes gets none. A Relation message whose columns (names,
    types, typmods, key flags) differ from the table's open file closes that file; the next
    row opens part + 1 with the new header.

    `floors` (optional) keeps, per table, only the transactions committed at or after the
    table's snapshot LSN, and drops the changes of tables it does not name: a table
    snapshotted after the slot's position (added later, re-snapshotted) then gets no change
    its snapshot already holds, and a table no longer configured gets no files. `_seq` still
    counts every change of the transaction, so it means the same whatever is kept.
    """

    def __init__(
        self,
        open_part: OpenPart,
        compressor: Callable[[], Compressor],
        *,
        block_size: int = 4 << 20,
        gather_bytes: int = GATHER_BYTES,
        floors: Mapping[TableKey, int] | None = None,
    ) -> None:
        self._open_part = open_part
        self._floors = floors
        self._floor: dict[int, int] = {}  # relid → lowest commit LSN kept (floors only)
        self._compressor = compressor
        self._block_size = block_size
        self._gather_bytes = gather_bytes
        self._relations: dict[int, Relation] = {}
        self._open: dict[TableKey, _Part] = {}  # the current file of each table
        self._by_relid: dict[int, _Part] = {}  # cache of _open by relid
        self._next_part: Counter[TableKey] = Counter()
        self._parts: list[_Part] = []  # every file, in opening order
        self._touched: set[int] = set()  # id() of parts written in this transaction
        self._commit_lsn = 0
        self._commit_time = 0
        self._commit_lsn_hex = b""
        self._prefix_tail = b""
        self._seq = 0
        self._in_txn = False
        self.changes = 0
        self.skipped = 0  # changes dropped by `floors`

    def relation(self, rel: Relation) -> None:
        key = TableKey(rel.namespace, rel.name)
        if self._floors is not None:
            self._floor[rel.relid] = self._floors.get(key, _SKIP_ALL)
            if key not in self._floors:
                self._relations[rel.relid] = rel
                return  # never written: its columns do not matter
        clash = {*META_COLUMNS, UNCHANGED_COLUMN} | {
            OLD_PREFIX + c.name for c in rel.columns if c.is_key
        }
        for c in rel.columns:
            if c.name in clash:
                raise ChangeFileError(
                    f"table {key}: column {c.name!r} clashes with a change-file column of the "
                    "same name; rename the column or exclude the table from CDC"
                )
        self._relations[rel.relid] = rel
        self._by_relid.pop(rel.relid, None)
        current = self._open.get(key)
        if current is not None and current.signature != _signature(rel.columns):
            current.close()
            del self._open[key]
            self._by_relid = {r: p for r, p in self._by_relid.items() if p is not current}

    def begin(self, msg: Begin) -> None:
        if self._in_txn:
            raise ProtocolError("Begin inside a transaction")
        self._in_txn = True
        self._seq = 0
        self._commit_lsn = msg.final_lsn
        self._commit_time = msg.commit_time
        self._commit_lsn_hex = lsn_hex(msg.final_lsn).encode()
        # "_xid,_commit_time," — constant for the transaction
        self._prefix_tail = f"{msg.xid},{pg_timestamptz_text(msg.commit_time)},".encode()
        self._touched.clear()

    def commit(self, msg: Commit) -> None:
        if not self._in_txn or msg.commit_lsn != self._commit_lsn:
            raise ProtocolError("Commit without its Begin")
        self._in_txn = False
        for part in self._parts:
            if id(part) in self._touched:
                stats = part.stats
                if stats.first_commit_lsn is None:
                    stats.first_commit_lsn = self._commit_lsn
                    stats.first_commit_time = self._commit_time
                stats.last_commit_lsn = self._commit_lsn
                stats.last_commit_time = self._commit_time

    def _part(self, relid: int) -> _Part:
        part = self._by_relid.get(relid)
        if part is not None:
            return part
        rel = self._relations.get(relid)
        if rel is None:
            raise ProtocolError(f"change for relation {relid} before its Relation message")
        key = TableKey(rel.namespace, rel.name)
        part = self._open.get(key)
        if part is None:
            index = self._next_part[key]
            self._next_part[key] += 1
            out = BlockCutter(self._compressor(), self._open_part(key, index), self._block_size)
            stats = PartStats(key, index, rel.columns, change_columns(rel.columns))
            part = self._open[key] = _Part(stats, out, self._gather_bytes)
            self._parts.append(part)
        self._by_relid[relid] = part
        return part

    def data(self, lsn: int, raw: bytes) -> None:
        """One raw Insert/Update/Delete/Truncate message at WAL position `lsn` (the SQL
        function's `lsn` column)."""
        if not self._in_txn:
            raise ProtocolError("change outside a transaction")
        kind = raw[0]
        if kind == 0x54:  # 'T'
            msg = decode(raw)
            assert isinstance(msg, Truncate)
            for relid in msg.relids:
                if self._floors is not None and self._skip(relid):
                    self._seq += 1
                    continue
                part = self._part(relid)
                self._seq += 1
                self._touched.add(id(part))
                part.add("T", self._prefix(b"T", lsn), [b""] * part.ncols, None, None)
                self.changes += 1
            return
        (relid,) = _unpack_I(raw, 1)
        if self._floors is not None and self._skip(relid):
            self._seq += 1
            return
        part = self._part(relid)
        self._touched.add(id(part))
        self._seq += 1
        self.changes += 1
        tag = raw[5]
        if kind == 0x49:  # 'I'
            if tag != 0x4E:
                raise ProtocolError("insert without a new tuple")
            new, _, unchanged = csv_tuple(raw, 6, part.plain)
            part.add("I", self._prefix(b"I", lsn), new, unchanged, None)
        elif kind == 0x55:  # 'U'
            old = None
            pos = 5
            if tag == 0x4B or tag == 0x4F:  # 'K' / 'O'
                old, pos, _ = csv_tuple(raw, 6, part.plain)
                tag = raw[pos]
            if tag != 0x4E:
                raise ProtocolError("update without a new tuple")
            new, _, unchanged = csv_tuple(raw, pos + 1, part.plain)
            part.add("U", self._prefix(b"U", lsn), new, unchanged, old)
        elif kind == 0x44:  # 'D'
            if tag != 0x4B and tag != 0x4F:
                raise ProtocolError("delete without an old key or old tuple")
            old, _, _ = csv_tuple(raw, 6, part.plain)
            part.add("D", self._prefix(b"D", lsn), old, None, None)
        else:
            raise ProtocolError(f"not a data message: {chr(kind)!r}")

    def _skip(self, relid: int) -> bool:
        floor = self._floor.get(relid)
        if floor is None:
            raise ProtocolError(f"change for relation {relid} before its Relation message")
        if self._commit_lsn < floor:
            self.skipped += 1
            return True
        return False

    def _prefix(self, op: bytes, lsn: int) -> bytes:
        return b"%s,%s,%016X,%s%d," % (
            op,
            self._commit_lsn_hex,
            lsn,
            self._prefix_tail,
            self._seq,
        )

    @property
    def in_transaction(self) -> bool:
        return self._in_txn

    def finish(self) -> list[PartStats]:
        """Flush every file; the caller then closes and publishes what `open_part` returned."""
        if self._in_txn:
            raise ProtocolError("the change stream ended inside a transaction")
        for key, part in list(self._open.items()):
            part.close()
            del self._open[key]
        self._by_relid.clear()
        return [p.stats for p in self._parts]

"""A decoder of the pgoutput plugin's messages ("Logical Replication Message Formats" in the
PostgreSQL documentation, protocol versions 1 and 2).

We read the slot through the SQL functions (`pg_logical_slot_peek_binary_changes`), where each
row's `data` is exactly one of these messages, so this module is pure byte parsing with no
I/O. No maintained Python decoder exists (the PyPI ones are 0.0.x or abandoned), hence ours.

Values arrive as PostgreSQL's text output (`'t'`): the same bytes COPY writes for the value,
produced by the decoding session's settings (TimeZone, DateStyle, ...) and converted to its
client_encoding; we keep them as `bytes` and never decode them, so a change file can carry
them byte for byte. A `'u'` value is a TOASTed column the update did not change and whose
value PostgreSQL therefore did not log: the decoder returns the `UNCHANGED` marker and the
change file names the column in `_unchanged`. `'b'` (binary) only appears when a subscriber
asks for `binary 'true'`; we never do, so it is an error rather than silently other bytes.

Protocol version 2 adds streamed in-progress transactions (only with the `streaming` option,
which pg_assets does not use): inside a Stream Start/Stop block the data messages carry the
streamed transaction's xid first. `Decoder` tracks that state; `decode` is the stateless
form for a non-streaming session.
"""

import datetime as dt
import struct
from dataclasses import dataclass, field

PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

_H = struct.Struct(">H")
_i = struct.Struct(">i")
_I = struct.Struct(">I")
_Q = struct.Struct(">Q")
_BEGIN = struct.Struct(">QqI")  # final lsn, commit time, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit lsn, end lsn, commit time
_COLUMN_TAIL = struct.Struct(">Ii")  # type oid, type modifier
_STREAM_COMMIT = struct.Struct(">IBQQq")

TRUNCATE_CASCADE = 1
TRUNCATE_RESTART_IDENTITY = 2


class ProtocolError(ValueError):
    """The bytes are not a pgoutput message we understand (or a binary value we never ask for)."""


class _Unchanged:
    """The `'u'` marker: a TOASTed value the change did not touch and PostgreSQL did not log."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()
BINARY_VALUE = (
    "binary tuple value received; pg_assets reads text output only "
    "(do not pass the 'binary' option)"
)
Value = bytes | None | _Unchanged


def commit_datetime(pg_microseconds: int) -> dt.datetime:
    """A TimestampTz (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return PG_EPOCH + dt.timedelta(microseconds=pg_microseconds)


@dataclass(slots=True, frozen=True)
class Begin:
    final_lsn: int  # the LSN of the transaction's commit record (= Commit.commit_lsn)
    commit_time: int  # microseconds since 2000-01-01 UTC
    xid: int


@dataclass(slots=True, frozen=True)
class Commit:
    flags: int
    commit_lsn: int  # start of the commit record
    end_lsn: int  # end of the commit record: where a slot is advanced to so this one is done
    commit_time: int


@dataclass(slots=True, frozen=True)
class Origin:
    origin_lsn: int
    name: str


@dataclass(slots=True, frozen=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """Part of the replica identity (primary key, the chosen index, or every column under
        REPLICA IDENTITY FULL)."""
        return bool(self.flags & 1)


@dataclass(slots=True, frozen=True)
class Relation:
    relid: int
    namespace: str  # '' for pg_catalog
    name: str
    replica_identity: str  # relreplident: 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]
    xid: int | None = None  # only inside a streamed block (protocol 2)


@dataclass(slots=True, frozen=True)
class Type:
    type_oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(slots=True, frozen=True)
class Insert:
    relid: int
    new: list[Value]
    xid: int | None = None


@dataclass(slots=True, frozen=True)
class Update:
    relid: int
    old_kind: str | None  # 'K' old key (the key changed), 'O' old row (REPLICA IDENTITY FULL)
    old: list[Value] | None
    new: list[Value]
    xid: int | None = None


@dataclass(slots=True, frozen=True)
class Delete:
    relid: int
    old_kind: str  # 'K' or 'O'
    old: list[Value]
    xid: int | None = None


@dataclass(slots=True, frozen=True)
class Truncate:
    relids: tuple[int, ...]
    options: int
    xid: int | None = None

    @property
    def cascade(self) -> bool:
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


@dataclass(slots=True, frozen=True)
class Message:
    """`pg_logical_emit_message` output (only with the `messages` option, which we never set)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(slots=True, frozen=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(slots=True, frozen=True)
class StreamStop:
    pass


@dataclass(slots=True, frozen=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(slots=True, frozen=True)
class StreamAbort:
    xid: int
    subxid: int


Decoded = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | Message
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
)


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("unterminated string")
    return buf[pos:end].decode("utf-8"), end + 1


def read_tuple(buf: bytes, pos: int) -> tuple[list[Value], int]:
    """TupleData at `pos`: the values (bytes / None / UNCHANGED) and the position after it."""
    (n,) = _H.unpack_from(buf, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    unpack = _i.unpack_from
    for _ in range(n):
        kind = buf[pos]
        pos += 1
        if kind == 0x74:  # 't'
            (size,) = unpack(buf, pos)
            pos += 4
            end = pos + size
            if size < 0 or end > len(buf):
                raise ProtocolError(f"text value of {size} bytes overruns the message")
            append(buf[pos:end])
            pos = end
        elif kind == 0x6E:  # 'n'
            append(None)
        elif kind == 0x75:  # 'u'
            append(UNCHANGED)
        elif kind == 0x62:  # 'b'
            raise ProtocolError(BINARY_VALUE)
        else:
            raise ProtocolError(f"unknown tuple value kind {chr(kind)!r}")
    return values, pos


def _relation(buf: bytes, pos: int, xid: int | None) -> Relation:
    (relid,) = _I.unpack_from(buf, pos)
    namespace, pos = _string(buf, pos + 4)
    name, pos = _string(buf, pos)
    replident = chr(buf[pos])
    (ncols,) = _H.unpack_from(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(ncols):
        flags = buf[pos]
        colname, pos = _string(buf, pos + 1)
        oid, typmod = _COLUMN_TAIL.unpack_from(buf, pos)
        pos += 8
        columns.append(Column(flags, colname, oid, typmod))
    return Relation(relid, namespace, name, replident, tuple(columns), xid)


def _decode(buf: bytes, streamed: bool) -> Decoded:
    kind = buf[0]
    pos = 1
    xid: int | None = None
    if streamed and kind in b"RYIUDTM":
        (xid,) = _I.unpack_from(buf, 1)
        pos = 5
    if kind == 0x49:  # 'I'
        (relid,) = _I.unpack_from(buf, pos)
        if buf[pos + 4] != 0x4E:
            raise ProtocolError("insert without a new tuple")
        new, end = read_tuple(buf, pos + 5)
        return Insert(relid, new, xid)
    if kind == 0x55:  # 'U'
        (relid,) = _I.unpack_from(buf, pos)
        pos += 4
        old_kind = None
        old = None
        if buf[pos] in (0x4B, 0x4F):  # 'K', 'O'
            old_kind = chr(buf[pos])
            old, pos = read_tuple(buf, pos + 1)
        if buf[pos] != 0x4E:
            raise ProtocolError("update without a new tuple")
        new, end = read_tuple(buf, pos + 1)
        return Update(relid, old_kind, old, new, xid)
    if kind == 0x44:  # 'D'
        (relid,) = _I.unpack_from(buf, pos)
        pos += 4
        if buf[pos] not in (0x4B, 0x4F):
            raise ProtocolError("delete without an old key or old tuple")
        old_kind = chr(buf[pos])
        old, end = read_tuple(buf, pos + 1)
        return Delete(relid, old_kind, old, xid)
    if kind == 0x42:  # 'B'
        return Begin(*_BEGIN.unpack_from(buf, 1))
    if kind == 0x43:  # 'C'
        return Commit(*_COMMIT.unpack_from(buf, 1))
    if kind == 0x52:  # 'R'
        return _relation(buf, pos, xid)
    if kind == 0x59:  # 'Y'
        (oid,) = _I.unpack_from(buf, pos)
        namespace, pos = _string(buf, pos + 4)
        name, pos = _string(buf, pos)
        return Type(oid, namespace, name, xid)
    if kind == 0x54:  # 'T'
        (nrels,) = _I.unpack_from(buf, pos)
        options = buf[pos + 4]
        relids = struct.unpack_from(f">{nrels}I", buf, pos + 5)
        return Truncate(tuple(relids), options, xid)
    if kind == 0x4F:  # 'O'
        (origin_lsn,) = _Q.unpack_from(buf, 1)
        name, _ = _string(buf, 9)
        return Origin(origin_lsn, name)
    if kind == 0x4D:  # 'M'
        flags = buf[pos]
        (lsn,) = _Q.unpack_from(buf, pos + 1)
        prefix, pos = _string(buf, pos + 9)
        (size,) = _I.unpack_from(buf, pos)
        return Message(bool(flags & 1), lsn, prefix, bytes(buf[pos + 4 : pos + 4 + size]), xid)
    if kind == 0x53:  # 'S'
        (sxid,) = _I.unpack_from(buf, 1)
        return StreamStart(sxid, buf[5] == 1)
    if kind == 0x45:  # 'E'
        return StreamStop()
    if kind == 0x63:  # 'c'
        return StreamCommit(*_STREAM_COMMIT.unpack_from(buf, 1))
    if kind == 0x41:  # 'A'
        sxid, subxid = struct.unpack_from(">II", buf, 1)
        return StreamAbort(sxid, subxid)
    raise ProtocolError(f"unknown pgoutput message type {chr(kind)!r}")


def decode(data: bytes) -> Decoded:
    """One message of a non-streaming session (protocol 1, or 2 without `streaming`)."""
    try:
        return _decode(data, False)
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise ProtocolError(f"truncated or malformed pgoutput message: {e}") from e


@dataclass
class Decoder:
    """Stateful decoding for protocol 2 with `streaming`: data messages between Stream Start
    and Stream Stop carry the streamed transaction's xid first."""

    in_stream: bool = field(default=False)

    def decode(self, data: bytes) -> Decoded:
        try:
            msg = _decode(data, self.in_stream)
        except (struct.error, IndexError, UnicodeDecodeError) as e:
            raise ProtocolError(f"truncated or malformed pgoutput message: {e}") from e
        if isinstance(msg, StreamStart):
            self.in_stream = True
        elif isinstance(msg, StreamStop):
            self.in_stream = False
        return msg

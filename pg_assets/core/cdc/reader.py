"""One batch of whole committed transactions, streamed from a logical slot into change files.

    SELECT lsn, data FROM pg_logical_slot_peek_binary_changes(slot, NULL, max_messages,
        'proto_version', '1', 'publication_names', publication)

runs through a server-side cursor (psycopg named cursor, `itersize` rows per round trip), so a
transaction of millions of rows is streamed, never held in client memory. The server stops
decoding after the first commit that brings the output to `max_messages` rows (the check runs
after each WAL record, and a transaction's changes are all emitted when its commit record is
decoded), so a batch always holds whole transactions; a transaction larger than the limit
comes whole in one batch. Without the `streaming` option pgoutput emits only committed
transactions, in commit order. We still verify it: a stream that ends inside a transaction is
an error, never a batch.

Peek, not get: reading does not move the slot. The caller advances it to `Batch.end_lsn`
(`slot.advance_slot`) only once the batch is durable in the lake; until then a crash simply
means the same changes are read again.

Values are produced by PostgreSQL's output functions in this session, so the reading
transaction pins the settings that change their text (`PINNED_SETTINGS`, the same ones every
pg_assets COPY runs under) with SET LOCAL: a change file then holds the bytes COPY would.
"""

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pg_assets.core.cdc.changes import GATHER_BYTES, ChangeWriter, OpenPart, PartStats, TableKey
from pg_assets.core.cdc.lsn import parse_lsn
from pg_assets.core.cdc.pgoutput import (
    Begin,
    Commit,
    Message,
    Origin,
    ProtocolError,
    Relation,
    Type,
    decode,
)
from pg_assets.core.compression import Compressor
from pg_assets.core.session import PINNED_SETTINGS

__all__ = ["PINNED_SETTINGS", "Batch", "CdcError", "pin_session", "read_batch"]


HEARTBEAT_PREFIX = "pg_assets"
# Rows per round trip of the named cursor: client memory is bounded by itersize × the largest
# message (one row's values), so this stays modest; per-fetch overhead is negligible at 2000.
DEFAULT_ITERSIZE = 2_000
_DATA = frozenset(b"IUDT")  # Insert, Update, Delete, Truncate: formatted from raw bytes


class CdcError(RuntimeError):
    """A CDC operation failed; the message names the slot (and table), the cause is chained."""


@dataclass
class Batch:
    """Whole committed transactions read from the slot, written as change files.

    `start_lsn` is the slot's confirmed_flush_lsn when read (every transaction here committed
    at or after it); `end_lsn` is the end of the last commit record: advancing the slot there
    marks exactly these transactions consumed. `end_lsn is None`: nothing was pending. A batch
    may hold transactions and no changes: heartbeats (`slot.emit_heartbeat`), whose only
    purpose is to give the slot a point to advance to past WAL holding no published change.
    """

    slot: str
    publication: str
    start_lsn: int
    end_lsn: int | None = None
    first_commit_lsn: int | None = None
    last_commit_lsn: int | None = None
    first_commit_time: int | None = None
    last_commit_time: int | None = None
    transactions: int = 0
    changes: int = 0
    skipped: int = 0  # changes left out by `floors`
    messages: int = 0
    heartbeats: int = 0
    files: list[PartStats] = field(default_factory=list)
    origins: set[str] = field(default_factory=set)
    types: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def empty(self) -> bool:
        return self.end_lsn is None

    def counts(self) -> dict[TableKey, Counter[str]]:
        """Changes per table and op (I/U/D/T), over all of the table's files."""
        out: dict[TableKey, Counter[str]] = {}
        for f in self.files:
            out.setdefault(f.table, Counter()).update(f.ops)
        return out


def pin_session(conn: psycopg.Connection) -> None:
    """SET LOCAL the pinned settings (inside the caller's transaction): pg_assets' own
    connections have them from the start (`session.connect_kwargs`), any other gets them here,
    since the change files' values are rendered by the server in this session."""
    for name, value in PINNED_SETTINGS.items():
        conn.execute(
            sql.SQL("SELECT set_config({}, {}, true)").format(sql.Literal(name), sql.Literal(value))
        )


def _slot_position(conn: psycopg.Connection, slot: str) -> int:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text, wal_status, database = current_database(), plugin"
        " FROM pg_replication_slots WHERE slot_name = %s AND slot_type = 'logical'",
        [slot],
    ).fetchone()
    if row is None:
        raise CdcError(f"replication slot {slot!r} does not exist (run `pg-assets cdc setup`)")
    confirmed, wal_status, same_db, plugin = row
    if wal_status == "lost" or confirmed is None:
        raise CdcError(
            f"replication slot {slot!r} is lost (wal_status={wal_status}): the WAL it needed was "
            "removed and changes are missing; drop it and re-snapshot: "
            "`pg-assets cdc drop --yes && pg-assets cdc setup`"
        )
    if not same_db:
        raise CdcError(f"replication slot {slot!r} belongs to another database")
    if plugin != "pgoutput":
        raise CdcError(f"replication slot {slot!r} uses plugin {plugin!r}, not pgoutput")
    return parse_lsn(confirmed)


def iter_messages(
    conn: psycopg.Connection,
    slot: str,
    publication: str,
    *,
    max_messages: int | None = None,
    itersize: int = DEFAULT_ITERSIZE,
    proto_version: int = 1,
    messages: bool = False,
):
    """(lsn, raw message) rows of a peek, through a named cursor; inside the caller's
    transaction. `max_messages` is PostgreSQL's `upto_nchanges`; `messages` asks pgoutput for
    `pg_logical_emit_message` output too (see `slot.emit_heartbeat`)."""
    cur = conn.cursor(name="pg_assets_cdc_peek", binary=True)
    cur.itersize = itersize
    try:
        cur.execute(
            # the LSN as int8 (binary): psycopg loads it in C, no per-row Python loader
            "SELECT (lsn - '0/0')::int8, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s,"
            " 'proto_version', %s, 'publication_names', %s, 'messages', %s)",
            [slot, max_messages, str(proto_version), publication, str(messages).lower()],
        )
        yield from cur
    finally:
        cur.close()


def read_batch(
    conn: psycopg.Connection,
    slot: str,
    publication: str,
    open_part: OpenPart,
    compressor: Callable[[], Compressor],
    *,
    max_messages: int | None = 1_000_000,
    itersize: int = DEFAULT_ITERSIZE,
    messages: bool = True,
    block_size: int = 4 << 20,
    gather_bytes: int = GATHER_BYTES,
    floors: Mapping[TableKey, int] | None = None,
) -> Batch:
    """Read the next batch from `slot` (without consuming it) into change files.

    `conn` must not be in a transaction: the read runs in its own, which is rolled back (it
    changed nothing). `open_part(table, part)` is called for each change file when its first
    row arrives and returns where its compressed blocks go; on return every file is flushed
    (the caller closes/publishes what it opened, or discards all of it if this raises).
    `floors`: see `ChangeWriter` (per-table snapshot LSNs; other tables are dropped).
    """
    started = time.perf_counter()
    writer = ChangeWriter(
        open_part, compressor, block_size=block_size, gather_bytes=gather_bytes, floors=floors
    )
    try:
        with conn.transaction(force_rollback=True):
            pin_session(conn)
            batch = Batch(slot, publication, _slot_position(conn, slot))
            for lsn, data in iter_messages(
                conn,
                slot,
                publication,
                max_messages=max_messages,
                itersize=itersize,
                messages=messages,
            ):
                batch.messages += 1
                if data[0] in _DATA:
                    writer.data(lsn, data)
                    continue
                msg = decode(data)
                if isinstance(msg, Begin):
                    writer.begin(msg)
                    if batch.first_commit_lsn is None:
                        batch.first_commit_lsn = msg.final_lsn
                        batch.first_commit_time = msg.commit_time
                elif isinstance(msg, Commit):
                    writer.commit(msg)
                    batch.transactions += 1
                    batch.end_lsn = msg.end_lsn
                    batch.last_commit_lsn = msg.commit_lsn
                    batch.last_commit_time = msg.commit_time
                elif isinstance(msg, Relation):
                    writer.relation(msg)
                elif isinstance(msg, Type):
                    ns = msg.namespace
                    batch.types[msg.type_oid] = f"{ns}.{msg.name}" if ns else msg.name
                elif isinstance(msg, Origin):
                    batch.origins.add(msg.name)
                elif isinstance(msg, Message):
                    if msg.transactional and msg.prefix == HEARTBEAT_PREFIX:
                        batch.heartbeats += 1
                    # other applications' messages are not table changes: skipped
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} in a non-streaming read")
            batch.changes = writer.changes
            batch.skipped = writer.skipped
            batch.files = writer.finish()
    except psycopg.Error as e:
        raise CdcError(f"reading replication slot {slot!r} failed: {e}") from e
    except ProtocolError as e:
        raise CdcError(f"replication slot {slot!r}: {e}") from e
    batch.seconds = time.perf_counter() - started
    return batch

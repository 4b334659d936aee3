"""The source side of CDC: publication, logical slot, exported snapshot, advance, health, and
the checks `pg-assets check` runs before any of it.

One publication and one pgoutput slot per source. The publication is created with
`publish_via_partition_root = true`, so a partitioned table's changes arrive under the parent
that the config names, whatever partition holds the row.

The initial snapshot must match the slot exactly. `exported_snapshot` creates the slot over a
`replication=database` connection with `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')` (psycopg
3 has no replication API, but the simple query protocol through `pgconn.exec_` runs walsender
commands), which returns the slot's consistent point C and a snapshot name. While that
connection stays open and idle, any other session can `SET TRANSACTION SNAPSHOT` to it: a COPY
there sees exactly the transactions that committed before C, and the slot yields exactly those
that commit at or after C. Snapshot + replayed changes = the table, no gap, no overlap.

A table added to the publication later cannot use the main slot's (long gone) snapshot; it is
snapshotted through a TEMPORARY slot created the same way after the ADD TABLE (consistent
point C2, dropped when the connection closes), and its changes in the main slot's stream apply
from `_commit_lsn >= C2`. No lock is needed for that: creating a slot waits for every
transaction in progress to end, so a transaction that wrote the table before the ADD TABLE
(whose earlier changes pgoutput decodes as unpublished) commits before C2 and is in the
snapshot, and the stream's copies of commits before C2 are the ones the filter drops.

Every statement that could wait on a lock runs with a `lock_timeout`; every connection attempt
has a connect timeout.
"""

import re
import select
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import ExecStatus

from pg_assets.core.cdc.changes import META_COLUMNS, OLD_PREFIX, UNCHANGED_COLUMN
from pg_assets.core.cdc.lsn import format_lsn, parse_lsn
from pg_assets.core.cdc.reader import CdcError
from pg_assets.core.identifiers import QualifiedName

_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")
DEFAULT_LOCK_TIMEOUT_S = 30.0


class SlotExistsError(CdcError):
    """The slot already exists: its snapshot was exported when it was created, not now."""


def validate_slot_name(slot: str) -> str:
    """PostgreSQL accepts only lower-case letters, digits and underscores (at most 63)."""
    if not _SLOT_NAME.fullmatch(slot):
        raise ValueError(
            f"{slot!r} is not a valid replication slot name: use at most 63 lower-case letters, "
            "digits and underscores"
        )
    return slot


def _display(conn: psycopg.Connection, table: QualifiedName) -> str:
    row = conn.execute("SELECT format('%%I.%%I', %s::text, %s::text)", [table.schema, table.name])
    return row.fetchone()[0]  # type: ignore[index]


def _set_lock_timeout(conn: psycopg.Connection, seconds: float) -> None:
    conn.execute(
        "SELECT set_config('lock_timeout', %s, true)", [f"{max(1, int(seconds * 1000))}ms"]
    )


# -- publication --------------------------------------------------------------------------


def publication_tables(conn: psycopg.Connection, publication: str) -> set[QualifiedName]:
    """Tables named in the publication itself (not the partitions it implies)."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_publication p"
        " JOIN pg_publication_rel r ON r.prpubid = p.oid"
        " JOIN pg_class c ON c.oid = r.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE p.pubname = %s",
        [publication],
    ).fetchall()
    return {QualifiedName(s, t) for s, t in rows}


def ensure_publication(
    conn: psycopg.Connection,
    publication: str,
    tables: Sequence[QualifiedName],
    *,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> list[QualifiedName]:
    """Create the publication if missing (all four operations, via partition root) and add
    any of `tables` it lacks; returns the tables added (all of them when it was created).
    Tables in the publication but not in `tables` are left alone."""
    with conn.transaction():
        _set_lock_timeout(conn, lock_timeout_s)
        row = conn.execute(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = %s", [publication]
        ).fetchone()
        if row is None:
            conn.execute(
                sql.SQL(
                    "CREATE PUBLICATION {} WITH (publish = 'insert, update, delete, truncate',"
                    " publish_via_partition_root = true)"
                ).format(sql.Identifier(publication))
            )
        elif not row[0]:
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(
                    sql.Identifier(publication)
                )
            )
    missing = [t for t in tables if t not in publication_tables(conn, publication)]
    if missing:
        add_tables(conn, publication, missing, lock_timeout_s=lock_timeout_s)
    return missing


def add_tables(
    conn: psycopg.Connection,
    publication: str,
    tables: Sequence[QualifiedName],
    *,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> None:
    """ALTER PUBLICATION … ADD TABLE (the ShareUpdateExclusive lock it takes does not block
    writers; it waits at most `lock_timeout_s` behind DDL or VACUUM). Snapshot the tables
    afterwards through a temporary slot (see the module doc)."""
    if not tables:
        return
    idents = sql.SQL(", ").join(t.identifier for t in tables)
    with conn.transaction():
        _set_lock_timeout(conn, lock_timeout_s)
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), idents)
        )


def drop_publication(conn: psycopg.Connection, publication: str) -> bool:
    """Drop the publication if it exists; True if it did."""
    with conn.transaction():
        existed = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", [publication]
        ).fetchone()
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication)))
    return existed is not None


# -- slot -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedSnapshot:
    slot: str
    consistent_lsn: int  # transactions committing at or after it are in the slot's stream
    snapshot_name: str  # valid while the creating connection stays open and idle

    @property
    def consistent_lsn_text(self) -> str:
        return format_lsn(self.consistent_lsn)


def slot_exists(conn: psycopg.Connection, slot: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [slot]).fetchone()
        is not None
    )


@contextmanager
def exported_snapshot(
    conninfo: str,
    slot: str,
    *,
    temporary: bool = False,
    connect_timeout_s: float = 10,
    timeout_s: float = 300,
    **connect_kwargs: Any,
) -> Iterator[ExportedSnapshot]:
    """Create logical slot `slot` (pgoutput) and export its consistent snapshot.

    The replication connection stays open (and idle) for the duration of the `with` block:
    import the snapshot in other sessions inside it (`import_snapshot`). On leaving, the
    connection closes, which ends the snapshot and, for a temporary slot, drops the slot.
    Raises SlotExistsError if a slot of that name exists: a snapshot is exported only at
    creation. Creation waits for transactions in progress to finish (that is what makes the
    point consistent): a long-running transaction on the source delays it, so the command is
    cancelled after `timeout_s` with an error saying what it waited for (no slot is left).
    """
    validate_slot_name(slot)
    try:
        conn = psycopg.connect(
            conninfo,
            replication="database",
            autocommit=True,
            connect_timeout=max(1, int(connect_timeout_s)),
            **connect_kwargs,
        )
    except psycopg.Error as e:
        raise CdcError(
            f"cannot open a replication connection to create slot {slot!r} (the role needs the "
            f"REPLICATION attribute and max_wal_senders > 0): {e}"
        ) from e
    with conn:
        command = (
            f'CREATE_REPLICATION_SLOT "{slot}"{" TEMPORARY" if temporary else ""}'
            " LOGICAL pgoutput (SNAPSHOT 'export')"
        )
        res = _exec_bounded(conn, command, timeout_s, slot)
        if res.status != ExecStatus.TUPLES_OK:
            error = (res.error_message or b"").decode(errors="replace").strip()
            state = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
            if state == b"42710":  # duplicate_object
                raise SlotExistsError(f"replication slot {slot!r} already exists")
            raise CdcError(f"creating replication slot {slot!r} failed: {error}")
        names = [res.fname(i) for i in range(res.nfields)]
        values = {
            (n or b"").decode(): (res.get_value(0, i) or b"").decode() for i, n in enumerate(names)
        }
        yield ExportedSnapshot(
            slot=values["slot_name"],
            consistent_lsn=parse_lsn(values["consistent_point"]),
            snapshot_name=values["snapshot_name"],
        )


def _exec_bounded(conn: psycopg.Connection, command: str, timeout_s: float, slot: str):
    """Run a walsender command through libpq's asynchronous interface, cancelling it after
    `timeout_s` (a replication connection has no statement_timeout to rely on)."""
    pgconn = conn.pgconn
    pgconn.send_query(command.encode())
    deadline = time.monotonic() + timeout_s
    while True:
        while pgconn.flush():
            select.select([], [pgconn.socket], [], 1)
        pgconn.consume_input()
        if not pgconn.is_busy():
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pgconn.get_cancel().cancel()
            raise CdcError(
                f"creating replication slot {slot!r} did not finish within {timeout_s:g} s: it "
                "waits for every transaction in progress on the source to end; look for "
                "long-running transactions (pg_stat_activity.xact_start) and retry"
            )
        select.select([pgconn.socket], [], [], min(remaining, 1))
    result = None
    while (res := pgconn.get_result()) is not None:
        result = result or res
    return result


def import_snapshot(conn: psycopg.Connection, snapshot: ExportedSnapshot | str) -> None:
    """Make the current transaction see the exported snapshot. Must be the transaction's first
    statement, in REPEATABLE READ (or SERIALIZABLE); the exporting connection must be open."""
    name = snapshot.snapshot_name if isinstance(snapshot, ExportedSnapshot) else snapshot
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(name)))


def ensure_slot(conn: psycopg.Connection, slot: str) -> bool:
    """Create the pgoutput slot without a snapshot if it is missing; True if created. For
    sources whose tables are all snapshotted through temporary slots (see module doc)."""
    validate_slot_name(slot)
    if slot_exists(conn, slot):
        return False
    try:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    except psycopg.errors.DuplicateObject:
        return False
    return True


def advance_slot(conn: psycopg.Connection, slot: str, lsn: int) -> int:
    """Move the slot's confirmed_flush_lsn to `lsn` (a batch's `end_lsn`): the transactions
    whose commit record starts before it are consumed and their WAL may be recycled.
    Idempotent and never backwards: a target at or behind the slot is a no-op (PostgreSQL
    would refuse it), so a retried advance after a lost response succeeds. Returns the
    slot's position."""
    try:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            [slot],
        ).fetchone()
        if row is None:
            raise CdcError(f"replication slot {slot!r} does not exist")
        if row[0] is not None and parse_lsn(row[0]) >= lsn:
            return parse_lsn(row[0])
        row = conn.execute(
            "SELECT end_lsn::text FROM pg_replication_slot_advance(%s, %s::pg_lsn)",
            [slot, format_lsn(lsn)],
        ).fetchone()
    except psycopg.Error as e:
        raise CdcError(
            f"advancing replication slot {slot!r} to {format_lsn(lsn)} failed: {e}"
        ) from e
    return parse_lsn(row[0])  # type: ignore[index]


def emit_heartbeat(conn: psycopg.Connection, slot: str) -> int:
    """Write a transactional logical message (prefix `pg_assets`, content the slot name) and
    return its LSN. Why: a slot only advances to the end of a decoded commit, so when the
    database writes WAL but none of it touches a published table, the slot would hold that
    WAL forever. The next batch contains this message's transaction (no changes), and
    advancing to its end releases the WAL. Needs an idle, writable connection on the primary.
    Committed with synchronous_commit on: logical decoding reads only flushed WAL, so the
    message is decodable as soon as this returns (not a wal_writer_delay later)."""
    try:
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = on")
            row = conn.execute(
                "SELECT pg_logical_emit_message(true, 'pg_assets', %s)::text", [slot]
            ).fetchone()
    except psycopg.Error as e:
        raise CdcError(f"heartbeat for replication slot {slot!r} failed: {e}") from e
    return parse_lsn(row[0])  # type: ignore[index]


def wait_for_flush(conn: psycopg.Connection, timeout_s: float = 30) -> None:
    """Wait until the WAL written so far is flushed, hence decodable: with synchronous_commit
    off (the embedded demo server), COMMIT returns up to wal_writer_delay before that."""
    (target,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()  # type: ignore[misc]
    deadline = time.monotonic() + timeout_s
    while not conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", [target]).fetchone()[
        0
    ]:  # type: ignore[index]
        if time.monotonic() > deadline:
            raise CdcError(f"WAL not flushed up to {target} within {timeout_s:g} s")
        time.sleep(0.02)


def drop_slot(conn: psycopg.Connection, slot: str) -> bool:
    """Drop the slot if it exists (it must not be in use); True if it did. The WAL it held
    back becomes recyclable: changes not yet in the lake are gone for good."""
    if not slot_exists(conn, slot):
        return False
    try:
        conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
    except psycopg.errors.UndefinedObject:
        return False
    return True


@dataclass(frozen=True)
class SlotHealth:
    slot: str
    plugin: str | None
    database: str | None
    active: bool
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    wal_status: str | None  # reserved / extended / unreserved / lost
    safe_wal_size: int | None  # bytes until the slot is at risk (None: no max_slot_wal_keep_size)
    current_lsn: int
    retained_bytes: int | None  # current WAL position - restart_lsn: what the slot holds back
    lag_bytes: int | None  # current WAL position - confirmed_flush_lsn
    invalidation_reason: str | None  # PostgreSQL 17+

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost" or self.confirmed_flush_lsn is None

    @property
    def at_risk(self) -> bool:
        return self.wal_status in ("unreserved", "lost")


def slot_health(conn: psycopg.Connection, slot: str) -> SlotHealth | None:
    """One cheap catalog read (no decoding): None if the slot does not exist."""
    row = conn.execute(
        "SELECT to_jsonb(s), CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
        " ELSE pg_current_wal_lsn() END::text FROM pg_replication_slots s WHERE slot_name = %s",
        [slot],
    ).fetchone()
    if row is None:
        return None
    s, current_text = row
    current = parse_lsn(current_text)

    def lsn(key: str) -> int | None:
        return parse_lsn(s[key]) if s.get(key) else None

    restart, confirmed = lsn("restart_lsn"), lsn("confirmed_flush_lsn")
    return SlotHealth(
        slot=slot,
        plugin=s.get("plugin"),
        database=s.get("database"),
        active=bool(s.get("active")),
        restart_lsn=restart,
        confirmed_flush_lsn=confirmed,
        wal_status=s.get("wal_status"),
        safe_wal_size=s.get("safe_wal_size"),
        current_lsn=current,
        retained_bytes=None if restart is None else max(0, current - restart),
        lag_bytes=None if confirmed is None else max(0, current - confirmed),
        invalidation_reason=s.get("invalidation_reason"),
    )


# -- `pg-assets check` ----------------------------------------------------------------------


def check_cdc(
    conn: psycopg.Connection,
    *,
    tables: Sequence[QualifiedName],
    publication: str,
    slot: str,
) -> list[str]:
    """Everything that would make CDC fail or silently miss changes, one line per problem,
    each naming the table or object and the setting to change. Empty = ready."""
    problems: list[str] = []
    (wal_level,) = conn.execute("SHOW wal_level").fetchone()  # type: ignore[misc]
    if wal_level != "logical":
        problems.append(
            f"wal_level is {wal_level!r}; CDC needs wal_level = logical "
            "(ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL)"
        )
    user, superuser, replication, can_create = conn.execute(
        "SELECT current_user, rolsuper, rolreplication,"
        " has_database_privilege(current_database(), 'CREATE')"
        " FROM pg_roles WHERE rolname = current_user"
    ).fetchone()  # type: ignore[misc]
    if not (superuser or replication):
        problems.append(
            f"role {user} lacks the REPLICATION attribute needed to create and read the slot "
            f"{slot!r} (ALTER ROLE {user} REPLICATION)"
        )
    try:
        validate_slot_name(slot)
    except ValueError as e:
        problems.append(str(e))
    pub = conn.execute(
        "SELECT p.pubowner::regrole::text, pg_has_role(p.pubowner, 'USAGE'),"
        " p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate, p.puballtables"
        " FROM pg_publication p WHERE p.pubname = %s",
        [publication],
    ).fetchone()
    in_pub: set[QualifiedName] = set()
    if pub is None:
        if not (superuser or can_create):
            problems.append(
                f"role {user} cannot create publication {publication!r}: it needs CREATE on "
                f"the database (GRANT CREATE ON DATABASE … TO {user})"
            )
    else:
        owner, owned, all_ops, all_tables = pub
        if not (owned or superuser):
            problems.append(
                f"publication {publication!r} is owned by {owner}; role {user} must own it to "
                f"add tables (ALTER PUBLICATION {publication} OWNER TO {user})"
            )
        if not all_ops:
            problems.append(
                f"publication {publication!r} does not publish every operation; CDC needs "
                f"ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, "
                "truncate')"
            )
        in_pub = publication_tables(conn, publication)
        if all_tables:
            in_pub = set(tables)
    existing = slot_health(conn, slot)
    if existing is not None:
        if existing.plugin != "pgoutput":
            problems.append(
                f"replication slot {slot!r} uses plugin {existing.plugin!r}, not pgoutput"
            )
        (db,) = conn.execute("SELECT current_database()").fetchone()  # type: ignore[misc]
        if existing.database != db:
            problems.append(
                f"replication slot {slot!r} belongs to database {existing.database!r}, not {db!r}"
            )
        if existing.lost:
            problems.append(
                f"replication slot {slot!r} is lost (wal_status={existing.wal_status}); drop it "
                "and re-snapshot: `pg-assets cdc drop --yes && pg-assets cdc setup`"
            )
    else:
        used, max_slots, senders = conn.execute(
            "SELECT (SELECT count(*) FROM pg_replication_slots),"
            " current_setting('max_replication_slots')::int,"
            " current_setting('max_wal_senders')::int"
        ).fetchone()  # type: ignore[misc]
        if used >= max_slots:
            problems.append(
                f"no free replication slot for {slot!r}: max_replication_slots = {max_slots} are "
                "all in use (raise max_replication_slots and restart PostgreSQL)"
            )
        if senders < 1:
            problems.append(
                "max_wal_senders = 0; creating the slot needs a replication connection "
                "(set max_wal_senders >= 1 and restart PostgreSQL)"
            )
    for table in tables:
        problems.extend(_check_table(conn, table, publication, in_pub, user, superuser))
    return problems


def _check_table(
    conn: psycopg.Connection,
    table: QualifiedName,
    publication: str,
    in_pub: set[QualifiedName],
    user: str,
    superuser: bool,
) -> list[str]:
    name = _display(conn, table)
    row = conn.execute(
        "SELECT c.oid, c.relkind, pg_has_role(c.relowner, 'USAGE'), c.relowner::regrole::text"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        [table.schema, table.name],
    ).fetchone()
    if row is None:
        return [f"table {name} does not exist"]
    oid, relkind, owned, owner = row
    if relkind not in ("r", "p"):
        return [f"{name} is not a table (relkind {relkind!r}); CDC needs a table"]
    problems = _column_clashes(conn, oid, name)
    (filtered,) = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_publication p JOIN pg_publication_rel r"
        " ON r.prpubid = p.oid WHERE p.pubname = %s AND r.prrelid = %s"
        " AND (to_jsonb(r) ->> 'prqual' IS NOT NULL OR to_jsonb(r) ->> 'prattrs' IS NOT NULL))",
        [publication, oid],
    ).fetchone()  # type: ignore[misc]
    if filtered:
        problems.append(
            f"publication {publication!r} publishes only some rows or columns of table {name} "
            f"(a WHERE clause or column list); CDC needs all of them (ALTER PUBLICATION "
            f"{publication} DROP TABLE {name}; ALTER PUBLICATION {publication} ADD TABLE {name})"
        )
    if table not in in_pub and not (owned or superuser):
        problems.append(
            f"table {name} is owned by {owner}; adding it to publication {publication!r} needs "
            f"its owner (ALTER TABLE {name} OWNER TO {user}, or add it as {owner})"
        )
    # every leaf: publish_via_partition_root routes changes through the parent, but PostgreSQL
    # checks the replica identity of the partition a row lives in
    leaves = conn.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname), c.relreplident,"
        " EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),"
        " EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)"
        " FROM (SELECT relid, isleaf, level FROM pg_partition_tree(%s::oid)"
        "       UNION ALL SELECT %s::oid, true, 0"  # a plain table: no tree, itself
        "       WHERE NOT EXISTS (SELECT 1 FROM pg_partition_tree(%s::oid))) t"
        " JOIN pg_class c ON c.oid = t.relid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.isleaf ORDER BY t.level, 1",
        [oid, oid, oid],
    ).fetchall()
    for leaf, replident, has_pk, has_ident_index in leaves:
        where = name if leaf == name else f"{leaf} (partition of {name})"
        if replident == "n":
            problems.append(
                f"table {where} has REPLICA IDENTITY NOTHING, so updates and deletes carry no "
                f"key (ALTER TABLE {leaf} REPLICA IDENTITY DEFAULT with a primary key, or FULL)"
            )
        elif replident == "d" and not has_pk:
            problems.append(
                f"table {where} has no primary key, so updates and deletes carry no key "
                f"(add a primary key, or ALTER TABLE {leaf} REPLICA IDENTITY FULL)"
            )
        elif replident == "i" and not has_ident_index:
            problems.append(
                f"table {where} has REPLICA IDENTITY USING INDEX but the index is gone "
                f"(ALTER TABLE {leaf} REPLICA IDENTITY USING INDEX <unique index>)"
            )
    return problems


def _column_clashes(conn: psycopg.Connection, oid: int, name: str) -> list[str]:
    """A column named like a change-file column (`_op`, …, `_old_<key>`) would make the file's
    header ambiguous; caught here rather than when its first change is read. Key columns are
    those pgoutput flags: the replica identity's (all of them under FULL)."""
    rows = conn.execute(
        "SELECT a.attname, CASE c.relreplident WHEN 'f' THEN true WHEN 'n' THEN false"
        " ELSE EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid"
        "  AND a.attnum = ANY (i.indkey) AND CASE c.relreplident WHEN 'd' THEN i.indisprimary"
        "  ELSE i.indisreplident END) END"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid WHERE c.oid = %s"
        " AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
        [oid],
    ).fetchall()
    reserved = {*META_COLUMNS, UNCHANGED_COLUMN} | {OLD_PREFIX + c for c, key in rows if key}
    return [
        f"table {name}: column {c!r} clashes with a change-file column of the same name; "
        "rename the column or exclude the table from CDC"
        for c, _ in rows
        if c in reserved
    ]

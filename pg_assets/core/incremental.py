"""Incremental batches: watermarks, the commit-safe cap, batch planning and publish.

An incremental table lands as numbered batches under `<source>/<S>.<T>/incremental/`:
batch 0 is a full snapshot (`COPY` of the whole table), each later batch holds the rows whose
cursor is in `(low, high]`, where `low` is the previous batch's `high` minus `lookback`. Each
batch is one REPEATABLE READ, READ ONLY snapshot streamed through the same core as a daily
partition (`stream_copy` → compressor → sink), published as `<T>-<batch:06d>-<n>.csv.gz` and
committed by writing `<T>-<batch:06d>.json` last. No Dagster here.

**State lives in the lake.** The next batch's number and `low` come from the newest batch
manifest in Bronze, never from the orchestrator: wiping the Dagster instance changes nothing,
a crash after a manifest neither loses nor repeats that batch, and a crash before it leaves an
uncommitted data file that the run committing the same batch number removes.

**A batch commits once.** The table's advisory lock is held by a session; if that session
dies (failover, `pg_terminate_backend`, `idle_session_timeout`) while the run publishes, another
run takes the lock and writes the same batch number. So nothing relies on the lock alone:
- the manifest is written create-only (`if_none_match`): of two runs that both read batch k,
  one commits it and the other fails, naming the winner, and takes its own data file back;
- each attempt's data file has its own name, `<T>-<batch:06d>-<n>.csv<ext>` with `n` the lowest
  version free, also published create-only: an attempt never overwrites another's file, so a
  loser can never replace the data a committed manifest names;
- once its manifest is committed, a run deletes the batch's lower versions (and the other
  codecs' up to its own): no manifest can ever name them any more, since the batch's manifest
  exists and names another file. Finding them costs a few deletes by name, never a listing of
  the folder, which grows by two files per batch forever. A higher version belongs to an
  attempt that started after ours; it fails its commit and deletes its own file.
- a commit whose outcome cannot be read back deletes nothing (the manifest may name the file):
  the next run finds either the batch committed or its number free.

**The commit-safe high watermark.** A row's cursor set by `now()` / `CURRENT_TIMESTAMP` (a
column default, or `SET updated_at = now()`) holds its transaction's *start* time, and the row
becomes visible only at commit. A naive `high = max(cursor)` therefore loses every row of a
transaction that started before the batch and commits after it: its cursor is below `high`,
and the next batch starts above `high` (dlt and Airbyte lose such rows this way). So the new
`high` of a time cursor never reaches the start of a transaction that can still commit.

Why the cap below is safe (for cursors written as `now()` of the writing transaction, on a
primary, with a clock that does not step backwards):

1. `read_cap` runs in its own short transaction *before* the batch's snapshot is taken. It
   reads `statement_timestamp()` (t_A, taken before `pg_stat_activity` is read) and the
   `xact_start` of every other backend of this database that is in a transaction, whether or
   not it holds a transaction ID yet. (Filtering on `backend_xid IS NOT NULL` is not enough:
   IDs are assigned at the first write, so a transaction that began before the batch, has only
   read so far and inserts after the check has no ID at the check but its `now()` is old.)
2. `cap = min(t_A - margin, oldest xact_start)`. Take any row version that commits after the
   snapshot. Its transaction X was, when its backend's entry was read, either in a transaction
   (then `xact_start(X) >= oldest >= cap`) or not yet (then `now()` of X, taken when X's first
   statement arrived, is at least t_A minus the instant between receiving that statement and
   publishing `xact_start`, which the margin covers). A transaction that had ended when its
   entry was read left the proc array before clearing `xact_start`, so if it committed it is
   visible to the snapshot taken afterwards. Hence every row version invisible to the snapshot
   has `cursor >= cap`.
3. `high = max(cursor) of the snapshot's rows below the cap`, so every such later row has
   `cursor > high` and is read by a later batch (`cursor > high - lookback`).

What this does not cover, and what then protects you:
- `clock_timestamp()`, application-supplied times, and integer cursors from sequences: the
  value is taken mid-transaction, in no order relative to commits. Only `lookback` helps (a
  late commit whose cursor is more than `lookback` below the watermark is missed); duplicates
  from the overlap are removable by `key` + `cursor`.
- `timestamp` and `date` cursors: the cap is converted with `timezone`, the writers' TimeZone;
  across a backward clock change of that zone (DST end) `lookback` must cover the shift.
- Prepared transactions (`pg_prepared_xacts`) keep their original `now()` but show no start
  time; while one exists in this database the watermark does not advance (the previous high
  is safe by induction). Batch 0 then records no high, and the next batch rereads from the
  start.
- A hot standby sees none of the primary's open transactions, and a role without
  `pg_read_all_stats` cannot see other roles' sessions: there is no cap then, so a time
  cursor requires `lookback` (the run fails otherwise) and the manifest says why.
- Deletes are never seen (that needs CDC), nor rows whose cursor is NULL after batch 0.

Open transactions hold the watermark back but lose nothing: a forgotten `idle in transaction`
session or a long report delays batches until it ends; the manifest and the sensor name it.
"""

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql

from pg_assets import __version__
from pg_assets.core.compression import CODECS, Codec
from pg_assets.core.copy_stream import CopyStats, stream_copy
from pg_assets.core.extract import MANIFEST_VERSION, ExtractionError, PartitionBusyError
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import IncrementalPaths, incremental_paths, table_folder
from pg_assets.core.planner import COPY_OPTIONS, CatalogError, Column
from pg_assets.core.publish import (
    advisory_lock,
    commit_create_only,
    commit_state,
    file_facts,
    read_manifest,
    snapshot_facts,
)
from pg_assets.core.session import PINNED_SETTINGS, check_session
from pg_assets.sinks.base import PreconditionFailed, Published, Sink, StagingFile

CursorKind = Literal["timestamptz", "timestamp", "date", "integer"]
_KINDS: dict[str, CursorKind] = {
    "timestamp with time zone": "timestamptz",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "smallint": "integer",
    "integer": "integer",
    "bigint": "integer",
}
# Watermarks travel as text and come back through these casts (`bigint` compares with every
# integer column through the btree cross-type operators, so indexes still apply).
_CAST: dict[CursorKind, sql.SQL] = {
    "timestamptz": sql.SQL("timestamptz"),
    "timestamp": sql.SQL("timestamp"),
    "date": sql.SQL("date"),
    "integer": sql.SQL("bigint"),
}
# Watermark text that reads back the same whatever the session's DateStyle and TimeZone.
_TEXT: dict[CursorKind, str] = {
    "timestamptz": "CASE WHEN isfinite({v}) THEN to_char({v} AT TIME ZONE 'UTC', "
    '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\') ELSE {v}::text END',
    "timestamp": "CASE WHEN isfinite({v}) THEN to_char({v}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US') "
    "ELSE {v}::text END",
    "date": "CASE WHEN isfinite({v}) THEN to_char({v}, 'YYYY-MM-DD') ELSE {v}::text END",
    "integer": "{v}::text",
}
MARGIN_S = 1.0  # see the module docstring, step 2
LOCK_PREFIX = "pg_assets"
MAX_VERSIONS = 100  # data files of one batch number before a run gives up (each is a kill)
# Backends that never write user rows: their transactions (a long autovacuum) must not hold
# the watermark back. Unknown types (extension workers) count, to be safe.
_NON_WRITERS = (
    "autovacuum launcher",
    "autovacuum worker",
    "walsender",
    "walreceiver",
    "walwriter",
    "walsummarizer",
    "checkpointer",
    "background writer",
    "startup",
    "archiver",
    "io worker",
    "logical replication launcher",
    "slotsync worker",
    "parallel worker",  # its leader is listed with the same transaction
)


class IncrementalError(ExtractionError):
    """A batch failed; the message names the table and the batch, the cause is chained."""


@dataclass(frozen=True)
class IncrementalSpec:
    """What the core needs to know about one incremental table (from the config file)."""

    source: str
    table: QualifiedName
    cursor: str
    key: tuple[str, ...]
    lookback: str | int | None = None
    batch_max_rows: int | None = None
    timezone: str = "UTC"  # the writers' TimeZone, for `timestamp` and `date` cursors

    @property
    def paths(self) -> IncrementalPaths:
        return incremental_paths(self.source, self.table)

    @property
    def lock_key(self) -> str:
        return f"{LOCK_PREFIX}:{table_folder(self.source, self.table)}:incremental"


@dataclass(frozen=True)
class IncrementalInfo:
    name: QualifiedName
    columns: tuple[Column, ...]
    cursor: Column
    kind: CursorKind
    key: tuple[str, ...]
    copy_whole: bool  # an ordinary table without generated columns: `COPY t (cols) TO STDOUT`
    cursor_index: str | None  # a valid btree index led by the cursor, if any
    cursor_nullable: bool
    relkind: str = "r"

    def warnings(self) -> list[str]:
        out = []
        if self.cursor_index is None:
            out.append(
                f"table {self.name}: no btree index starts with cursor column "
                f"{self.cursor.name!r}, so every sensor poll (max({self.cursor.name})) and every "
                f"batch scans the whole table; CREATE INDEX ON {self.name} ({self.cursor.name})"
            )
        if self.cursor_nullable:
            out.append(
                f"table {self.name}: cursor column {self.cursor.name!r} allows NULL; rows whose "
                "cursor is NULL land in batch 0 only"
            )
        return out


_TABLE_SQL = """
SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""
_COLUMNS_SQL = """
SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
       format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END, NULL),
       NOT a.attnotnull, a.attgenerated <> ''
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_INDEX_SQL = """
SELECT ic.relname FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
WHERE i.indrelid = %s AND i.indkey[0] = %s AND i.indpred IS NULL AND i.indisvalid
  AND am.amname = 'btree'
ORDER BY i.indnatts, ic.relname LIMIT 1
"""


def describe_incremental(conn: psycopg.Connection, spec: IncrementalSpec) -> IncrementalInfo:
    """Check table, cursor, key and lookback against the catalog; errors name the config key."""
    name = spec.table
    with conn.cursor() as cur:
        row = cur.execute(_TABLE_SQL, (name.schema, name.name)).fetchone()
        if row is None:
            raise CatalogError(f"table {name} does not exist (or is not visible to this role)")
        oid, relkind = row
        cols = cur.execute(_COLUMNS_SQL, (oid,)).fetchall()
        by_name = {n: (num, t, base, nullable) for num, n, t, base, nullable, _ in cols}
        listing = ", ".join(by_name)
        if spec.cursor not in by_name:
            raise CatalogError(
                f"table {name} has no column {spec.cursor!r} (columns: {listing})", "cursor"
            )
        attnum, ctype, base, nullable = by_name[spec.cursor]
        kind = _KINDS.get(base)
        if kind is None:
            raise CatalogError(
                f"column {spec.cursor!r} of table {name} has type {ctype}, which cannot be a "
                "cursor; use timestamptz, timestamp, date, smallint, integer or bigint",
                "cursor",
            )
        for k in spec.key:
            if k not in by_name:
                raise CatalogError(f"table {name} has no column {k!r} (columns: {listing})", "key")
        index = cur.execute(_INDEX_SQL, (oid, attnum)).fetchone()
        _check_lookback(cur, spec, kind)
    return IncrementalInfo(
        name=name,
        columns=tuple(Column(n, t) for _, n, t, _, _, _ in cols),
        cursor=Column(spec.cursor, ctype),
        kind=kind,
        key=spec.key,
        copy_whole=relkind == "r" and not any(generated for *_, generated in cols),
        cursor_index=index[0] if index else None,
        cursor_nullable=bool(nullable),
        relkind=relkind,
    )


def _check_lookback(cur: psycopg.Cursor, spec: IncrementalSpec, kind: CursorKind) -> None:
    lb = spec.lookback
    if lb is None:
        return
    if kind == "integer":
        if isinstance(lb, str) or lb < 0:
            raise CatalogError(
                f"cursor {spec.cursor!r} of table {spec.table} is an integer, so lookback must "
                f"be a count of cursor values such as 1000, not {lb!r}",
                "lookback",
            )
        return
    if not isinstance(lb, str):
        raise CatalogError(
            f"cursor {spec.cursor!r} of table {spec.table} is a {kind}, so lookback must be "
            f"an interval such as '5 minutes', not {lb!r}",
            "lookback",
        )
    try:
        with cur.connection.transaction():  # a savepoint: a bad interval leaves us usable
            (negative,) = cur.execute(  # type: ignore[misc]
                "SELECT %s::interval < interval '0'", (lb,)
            ).fetchone()
    except psycopg.DataError:
        negative = None
    if negative is None or negative:
        raise CatalogError(
            f"lookback {lb!r} of table {spec.table} is not a non-negative interval "
            "(e.g. '5 minutes', '1 hour')",
            "lookback",
        )


# -- the cap ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cap:
    """What `pg_stat_activity` and `pg_prepared_xacts` said just before the snapshot."""

    checked_at: dt.datetime
    at: dt.datetime | None  # every transaction that can still commit has now() >= at
    applied: bool  # False: no open-transaction information (standby, hidden sessions)
    hold: bool  # a prepared transaction exists: the watermark must not advance
    reason: str
    oldest: dict[str, Any] | None  # the oldest open transaction, for humans
    prepared: dict[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "hold": self.hold,
            "at": self.at.isoformat() if self.at else None,
            "reason": self.reason,
            "checked_at": self.checked_at.isoformat(),
            "oldest_transaction": self.oldest,
            "prepared_transaction": self.prepared,
        }


_CAP_SQL = sql.SQL("""
SELECT statement_timestamp(), pg_is_in_recovery(),
       o.start, o.pid, o.application_name, o.state, o.backend_xid,
       (SELECT count(*) FROM pg_stat_activity h
         WHERE h.datid = d.oid AND h.usesysid IS NOT NULL
           AND h.query = '<insufficient privilege>'),
       p.gid, p.prepared, p.owner,
       (SELECT count(*) FROM pg_prepared_xacts x WHERE x.database = current_database())
FROM (SELECT oid FROM pg_database WHERE datname = current_database()) d
LEFT JOIN LATERAL (
    SELECT coalesce(a.xact_start, a.query_start) AS start, a.pid, a.application_name, a.state,
           a.backend_xid::text AS backend_xid
    FROM pg_stat_activity a
    WHERE a.datid = d.oid AND a.pid <> pg_backend_pid()
      AND (a.xact_start IS NOT NULL OR a.state = 'active')
      AND coalesce(a.backend_type, '') NOT IN ({non_writers})
    ORDER BY 1 LIMIT 1) o ON true
LEFT JOIN LATERAL (
    SELECT x.gid, x.prepared, x.owner FROM pg_prepared_xacts x
    WHERE x.database = current_database() ORDER BY x.prepared LIMIT 1) p ON true
""").format(non_writers=sql.SQL(", ").join(sql.Literal(t) for t in _NON_WRITERS))


def read_cap(conn: psycopg.Connection, kind: CursorKind, margin_s: float = MARGIN_S) -> Cap:
    """Read the open transactions. Must run before the batch's snapshot is taken (its own
    transaction, or autocommit): see the module docstring for why the order matters."""
    row = conn.execute(_CAP_SQL).fetchone()
    assert row is not None
    checked_at, standby, start, pid, app, state, xid, hidden, gid, prepared, owner, n_prep = row
    oldest = (
        {
            "pid": pid,
            "application_name": app,
            "state": state,
            "xact_start": start.isoformat(),
            "backend_xid": xid,
        }
        if start is not None
        else None
    )
    prep = (
        {"gid": gid, "prepared": prepared.isoformat(), "owner": owner, "count": n_prep}
        if gid is not None
        else None
    )
    floor = checked_at - dt.timedelta(seconds=margin_s)
    if kind == "integer":
        return Cap(
            checked_at, None, False, False,
            "integer cursor: sequence values are not assigned in commit order; only lookback "
            "protects rows committed late", oldest, prep,
        )  # fmt: skip
    if standby:
        return Cap(
            checked_at, floor, False, False,
            "the source is a hot standby: the primary's open transactions are not visible "
            "here, so only lookback protects rows committed late", oldest, prep,
        )  # fmt: skip
    if hidden:
        return Cap(
            checked_at, floor, False, False,
            f"{hidden} session(s) of other roles are hidden from this role (it lacks "
            "pg_read_all_stats), so their open transactions cannot be seen; only lookback "
            "protects rows committed late", oldest, prep,
        )  # fmt: skip
    if prep is not None:
        return Cap(
            checked_at, None, True, True,
            f"prepared transaction {gid!r} (prepared {prepared.isoformat()}, {n_prep} in this "
            "database) may still commit rows with an older cursor: the watermark holds",
            oldest, prep,
        )  # fmt: skip
    if start is not None and start < floor:
        return Cap(
            checked_at, start, True, False,
            f"transaction of backend {pid} ({app or 'unnamed'}, {state}) open since "
            f"{start.isoformat()} may still commit rows with that cursor", oldest, prep,
        )  # fmt: skip
    return Cap(
        checked_at, floor, True, False,
        f"no older open transaction: {margin_s:g} s before the check", oldest, prep,
    )  # fmt: skip


def _bound(kind: CursorKind, cap: Cap, tz: str) -> sql.Composable | None:
    """The largest cursor value a batch may take, as SQL in the cursor's type."""
    if cap.at is None:
        return None
    at = sql.Literal(cap.at)
    if kind == "timestamptz":
        return sql.SQL("({} - interval '1 microsecond')").format(at)
    if kind == "timestamp":
        return sql.SQL("(({}::timestamptz AT TIME ZONE {}) - interval '1 microsecond')").format(
            at, sql.Literal(tz)
        )
    return sql.SQL("(({}::timestamptz AT TIME ZONE {})::date - 1)").format(at, sql.Literal(tz))


def _text(kind: CursorKind, expr: sql.Composable) -> sql.Composable:
    return sql.SQL(_TEXT[kind].replace("{v}", "({0})")).format(expr)


def _value(kind: CursorKind, text: str) -> sql.Composable:
    return sql.SQL("{}::{}").format(sql.Literal(text), _CAST[kind])


# -- reading the lake -----------------------------------------------------------------------


def latest_manifest(
    sink: Sink, paths: IncrementalPaths, hint: int | None = None
) -> dict[str, Any] | None:
    """The newest committed batch manifest, or None before batch 0.

    With `hint` (a batch known to be committed, e.g. from the sensor's cursor) this costs a
    few reads: the hinted manifest, then each following one until one is missing. Without
    it, or if the hinted batch is gone (retention), the folder is listed once."""
    if hint is not None and hint >= 0:
        manifest = read_manifest(sink, paths.manifest(hint))
        if manifest is not None:
            batch = hint
            while (nxt := read_manifest(sink, paths.manifest(batch + 1))) is not None:
                batch, manifest = batch + 1, nxt
            return manifest
    batches = sorted(
        b for f in sink.list_files(paths.folder) if (b := paths.batch_of_manifest(f)) is not None
    )
    for batch in reversed(batches):
        if (manifest := read_manifest(sink, paths.manifest(batch))) is not None:
            return manifest
    return None


# -- planning a batch -----------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    batch: int
    low: str | None  # exclusive; None: unbounded (batch 0, or no earlier high)
    high: str | None  # inclusive; None: no row could be taken yet
    previous_high: str | None
    newest_seen: str | None  # max(cursor) of the whole snapshot
    limited_by: str | None  # "cap", "batch_max_rows" or None
    advances: bool  # whether this is a batch worth publishing

    @property
    def full(self) -> bool:
        return self.batch == 0


def plan_bounds(
    conn: psycopg.Connection,
    info: IncrementalInfo,
    spec: IncrementalSpec,
    cap: Cap,
    previous: dict[str, Any] | None,
) -> Bounds:
    """Choose `(low, high]` inside the batch's snapshot: indexed max() lookups only."""
    kind, t, c = info.kind, info.name.identifier, sql.Identifier(info.cursor.name)
    batch = 0 if previous is None else int(previous["batch"]) + 1
    prev_high = previous["watermark"]["high"] if previous else None
    (newest,) = conn.execute(  # type: ignore[misc]
        sql.SQL("SELECT {} FROM {}").format(_text(kind, sql.SQL("max({})").format(c)), t)
    ).fetchone()
    bound = _bound(kind, cap, spec.timezone)
    if cap.hold:
        high = prev_high  # a prepared transaction: the previous high is the only safe one
    else:
        where = sql.SQL("WHERE {} <= {}").format(c, bound) if bound is not None else sql.SQL("")
        (high,) = conn.execute(  # type: ignore[misc]
            sql.SQL("SELECT {} FROM {} {}").format(
                _text(kind, sql.SQL("max({})").format(c)), t, where
            )
        ).fetchone()
    limited_by = None
    if high is not None and newest is not None and high != newest:
        limited_by = "cap"
    if prev_high is not None:
        if high is None:
            high = prev_high
        else:  # never below the previous high: `low` must never move backwards
            (high,) = conn.execute(  # type: ignore[misc]
                sql.SQL("SELECT {}").format(
                    _text(kind, sql.SQL("greatest({}, {})").format(
                        _value(kind, high), _value(kind, prev_high)
                    ))
                )
            ).fetchone()  # fmt: skip
    if batch > 0 and spec.batch_max_rows and high is not None:
        above = sql.SQL("{} > {} AND ").format(c, _value(kind, prev_high)) if prev_high else None
        (cut,) = conn.execute(  # type: ignore[misc]
            sql.SQL(
                "SELECT {txt} FROM (SELECT {c} AS v FROM {t} WHERE {above}{c} <= {hi} "
                "ORDER BY {c} OFFSET {n} LIMIT 1) s"
            ).format(
                txt=_text(kind, sql.SQL("v")),
                c=c,
                t=t,
                above=above or sql.SQL(""),
                hi=_value(kind, high),
                n=sql.Literal(spec.batch_max_rows - 1),
            )
        ).fetchone() or (None,)
        if cut is not None and cut != high:
            high, limited_by = cut, "batch_max_rows"
    low = None
    if prev_high is not None:
        if spec.lookback:
            lb = sql.Literal(spec.lookback)
            expr = {
                "timestamptz": sql.SQL("{} - {}::interval"),
                "timestamp": sql.SQL("{} - {}::interval"),
                "date": sql.SQL("({} - {}::interval)::date"),
                "integer": sql.SQL("{} - {}::bigint"),
            }[kind].format(_value(kind, prev_high), lb)
            (low,) = conn.execute(sql.SQL("SELECT {}").format(_text(kind, expr))).fetchone()  # type: ignore[misc]
        else:
            low = prev_high
    advances = batch == 0 or (high is not None and high != prev_high)
    return Bounds(batch, low, high, prev_high, newest, limited_by, advances)


def batch_select(info: IncrementalInfo, bounds: Bounds) -> sql.Composed | None:
    """`SELECT cols FROM t WHERE cursor > low AND cursor <= high`, or None for batch 0."""
    if bounds.full:
        return None
    cols = sql.SQL(", ").join(sql.Identifier(col.name) for col in info.columns)
    c = sql.Identifier(info.cursor.name)
    conds = []
    if bounds.low is not None:
        conds.append(sql.SQL("{} > {}").format(c, _value(info.kind, bounds.low)))
    assert bounds.high is not None
    conds.append(sql.SQL("{} <= {}").format(c, _value(info.kind, bounds.high)))
    return sql.SQL("SELECT {} FROM {} WHERE {}").format(
        cols, info.name.identifier, sql.SQL(" AND ").join(conds)
    )


def batch_statement(info: IncrementalInfo, bounds: Bounds) -> sql.Composed:
    select = batch_select(info, bounds)
    if select is not None:
        return sql.SQL("COPY ({}) TO STDOUT {}").format(select, COPY_OPTIONS)
    cols = sql.SQL(", ").join(sql.Identifier(col.name) for col in info.columns)
    if info.copy_whole:
        return sql.SQL("COPY {} ({}) TO STDOUT {}").format(info.name.identifier, cols, COPY_OPTIONS)
    return sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT {}").format(
        cols, info.name.identifier, COPY_OPTIONS
    )


def _lag_seconds(
    conn: psycopg.Connection, kind: CursorKind, value: str | None, tz: str
) -> float | None:
    """now − `value` in seconds (None for integer cursors or infinite values)."""
    if value is None or kind == "integer":
        return None
    now = {
        "timestamptz": sql.SQL("statement_timestamp()"),
        "timestamp": sql.SQL("(statement_timestamp() AT TIME ZONE {})").format(sql.Literal(tz)),
        "date": sql.SQL("(statement_timestamp() AT TIME ZONE {})").format(sql.Literal(tz)),
    }[kind]
    (lag,) = conn.execute(  # type: ignore[misc]
        sql.SQL("SELECT CASE WHEN isfinite(v) THEN extract(epoch FROM {} - v)::float8 END "
                "FROM (SELECT {}::timestamp{} AS v) s").format(
            now, sql.Literal(value), sql.SQL("tz") if kind == "timestamptz" else sql.SQL("")
        )
    ).fetchone()  # fmt: skip
    return None if lag is None else round(lag, 3)


# -- one batch, end to end ------------------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    batch: int
    stats: CopyStats
    info: IncrementalInfo
    bounds: Bounds
    cap: Cap
    published: Published
    manifest: dict[str, Any]
    previous: dict[str, Any] | None

    @property
    def warnings(self) -> list[str]:
        return self.info.warnings()


@dataclass(frozen=True)
class NoBatch:
    """Nothing to publish: no row above the previous high can be taken yet."""

    batch: int  # the batch number that was not written
    info: IncrementalInfo
    bounds: Bounds
    cap: Cap

    @property
    def warnings(self) -> list[str]:
        return self.info.warnings()

    @property
    def reason(self) -> str:
        b = self.bounds
        if b.newest_seen is None or b.newest_seen == b.previous_high:
            return f"no row above the watermark {b.previous_high}"
        return (
            f"newest cursor {b.newest_seen} is above the watermark {b.previous_high}, but it "
            f"cannot be taken yet: {self.cap.reason}"
        )


@contextmanager
def _table_lock(
    conn: psycopg.Connection, spec: IncrementalSpec, wait_s: float, where: str, run_id: str
) -> Iterator[None]:
    """Batches of one table never interleave: a session advisory lock, bounded wait."""

    def busy(holder: str) -> Exception:
        return PartitionBusyError(
            f"{where}: {holder} is extracting a batch of this table; gave up after waiting "
            f"{wait_s:g} s (postgres.lock_timeout_s)"
        )

    app = f"pg_assets run {run_id[:8]}" if run_id else "pg_assets"
    with advisory_lock(conn, spec.lock_key, wait_s, application_name=app, busy=busy):
        yield


def _lock_table(
    conn: psycopg.Connection, spec: IncrementalSpec, lock_timeout_s: float, where: str
) -> None:
    """`SET LOCAL lock_timeout` and `LOCK TABLE … IN ACCESS SHARE MODE`, in one round trip
    that takes no snapshot: DDL on the table committed before the batch's snapshot, or waits
    for the batch to end."""
    timeout = sql.SQL("SET LOCAL lock_timeout = {}").format(
        sql.Literal(f"{max(1, round(lock_timeout_s * 1000))}ms")
    )
    lock = sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(spec.table.identifier)
    try:
        conn.execute(sql.SQL("{}; {}").format(timeout, lock))
    except psycopg.errors.LockNotAvailable:
        raise IncrementalError(
            f"{where}: gave up waiting {lock_timeout_s:g} s for a lock on {spec.table}: DDL on "
            "it holds or awaits an exclusive lock (postgres.lock_timeout_s)"
        ) from None
    except psycopg.errors.UndefinedTable:
        raise CatalogError(
            f"table {spec.table} does not exist (or is not visible to this role)"
        ) from None


def _publish_data(
    sink: Sink,
    staging: StagingFile,
    paths: IncrementalPaths,
    batch: int,
    extension: str,
    size: int,
    where: str,
) -> tuple[str, int, Published]:
    """Publish `staging` as the batch's lowest free version, create-only: (relpath, version,
    what was published). Each taken version is one earlier attempt that did not take its file
    back (a killed run) or one still running (a run that lost the lock)."""
    for version in range(MAX_VERSIONS):
        rel = paths.data(batch, version, extension)
        try:
            return rel, version, sink.publish(staging, rel, expected_size=size, if_none_match=True)
        except PreconditionFailed:
            continue
    raise IncrementalError(
        f"{where}: {MAX_VERSIONS} data files of this batch are already in {paths.folder} without "
        "a manifest committing them; remove them (no manifest names them) and run again"
    )


def _remove_other_versions(
    sink: Sink, paths: IncrementalPaths, batch: int, version: int, extension: str
) -> None:
    """After the batch's manifest committed our version: delete its lower versions, and the
    other codecs' up to ours (a rerun after a codec change). No manifest can name them: the
    batch's manifest exists and is create-only. Best effort: a file left over is never named by
    a manifest, so readers that trust manifests never see it."""
    for other in {c.extension for c in CODECS.values()}:
        for v in range(version + (other != extension)):
            try:
                sink.delete(paths.data(batch, v, other))
            except Exception:
                pass


def extract_batch(
    conn: psycopg.Connection,
    *,
    spec: IncrementalSpec,
    sink: Sink,
    codec: Codec,
    level: int,
    run_id: str,
    block_size: int = 4 << 20,
    lock_timeout_s: float = 60,
    batch_hint: int | None = None,
    margin_s: float = MARGIN_S,
) -> BatchResult | NoBatch:
    """Extract, publish and commit the next batch of `spec.table` on the pooled connection
    `conn` (idle, REPEATABLE READ READ ONLY transactions; left idle).

    `batch_hint` is a batch number known to be committed (the sensor passes what it saw), so
    finding the newest manifest costs a few reads instead of a listing."""
    where = f"table {spec.table}, incremental batch"
    with _table_lock(conn, spec, lock_timeout_s, where, run_id):
        try:
            return _extract_locked(
                conn, spec=spec, sink=sink, codec=codec, level=level, run_id=run_id,
                block_size=block_size, lock_timeout_s=lock_timeout_s, batch_hint=batch_hint,
                margin_s=margin_s,
            )  # fmt: skip
        except (ExtractionError, CatalogError):
            raise
        except Exception as e:
            raise IncrementalError(f"extracting the next batch of {where} failed: {e}") from e


def _extract_locked(
    conn: psycopg.Connection,
    *,
    spec: IncrementalSpec,
    sink: Sink,
    codec: Codec,
    level: int,
    run_id: str,
    block_size: int,
    lock_timeout_s: float,
    batch_hint: int | None,
    margin_s: float,
) -> BatchResult | NoBatch:
    paths = spec.paths
    with conn.transaction():
        info = describe_incremental(conn, spec)
    previous = latest_manifest(sink, paths, batch_hint)
    batch = 0 if previous is None else int(previous["batch"]) + 1
    if previous is not None:  # a run killed after its commit left its batch's lower versions
        named = paths.version_of(f"{paths.folder}/{previous.get('file', '')}")
        if named is not None:
            extension = str(previous["file"]).partition(".csv")[2]  # "" for codec none
            _remove_other_versions(sink, paths, named[0], named[1], extension)
    where = f"table {spec.table}, batch {batch}"
    with conn.transaction():  # before the snapshot: see the module docstring
        cap = read_cap(conn, info.kind, margin_s)
    if not cap.applied and info.kind != "integer" and not spec.lookback:
        raise IncrementalError(
            f"{where}: cannot cap the watermark below open transactions ({cap.reason}); set "
            "'lookback' to cover the longest writing transaction (config key 'lookback')"
        )
    manifest_rel = paths.manifest(batch)
    staging: StagingFile | None = None
    data_rel: str | None = None  # set once this run's data file is published: ours to delete
    body: bytes | None = None
    committed: bool | None = False  # None: could not tell
    try:
        with conn.transaction():  # REPEATABLE READ, READ ONLY (the pool configures it)
            if info.relkind in ("r", "p", "v"):  # LOCK refuses materialized views
                _lock_table(conn, spec, lock_timeout_s, where)  # takes no snapshot
            check_session(conn)  # the snapshot starts here
            locked = describe_incremental(conn, spec)  # no DDL can change it until we commit
            if locked.kind != info.kind:
                raise IncrementalError(
                    f"{where}: the type of cursor {spec.cursor!r} changed during the batch "
                    f"({info.cursor.type} → {locked.cursor.type}); run it again"
                )
            info = locked
            snapshot = snapshot_facts(conn)
            bounds = plan_bounds(conn, info, spec, cap, previous)
            if not bounds.advances:
                return NoBatch(batch, info, bounds, cap)
            newest_in_batch = bounds.newest_seen if bounds.full else bounds.high
            lag = _lag_seconds(conn, info.kind, newest_in_batch, spec.timezone)
            statement = batch_statement(info, bounds)
            select = batch_select(info, bounds)
            staging = sink.open_staging(
                run_id, paths.data(batch, 0, codec.extension), codec.content_type
            )
            with conn.cursor() as cur:
                stats = stream_copy(
                    cur, statement, staging, codec.compressor(level), block_size=block_size
                )
            select_text = select.as_string(conn) if select is not None else None
        # the snapshot is released: what follows waits on the lake only
        data_rel, version, published = _publish_data(
            sink, staging, paths, batch, codec.extension, stats.compressed_bytes, where
        )
        staging = None
        extracted_at = dt.datetime.now(dt.UTC)
        manifest = {
            "version": MANIFEST_VERSION,
            "pg_assets_version": __version__,
            "kind": "incremental",
            "source": spec.source,
            "table": str(spec.table),
            "schema_name": spec.table.schema,
            "table_name": spec.table.name,
            "batch": batch,
            **file_facts(data_rel, published, stats, codec, level),
            "columns": [asdict(col) for col in info.columns],
            "source_relation": str(info.name),
            "cursor": {"column": info.cursor.name, "type": info.cursor.type, "kind": info.kind},
            "key": list(info.key),
            "filter": "full snapshot" if bounds.full else "cursor > low AND cursor <= high",
            "select": select_text,
            "watermark": {
                "low": bounds.low,
                "high": bounds.high,
                "previous_high": bounds.previous_high,
                "lookback": spec.lookback,
                "limited_by": bounds.limited_by,
                "timezone": spec.timezone,
            },
            "newest_seen": bounds.newest_seen,
            "lag_seconds": lag,
            "cap": cap.as_json(),
            "snapshot": snapshot,
            "session": dict(PINNED_SETTINGS),
            "extracted_at": extracted_at.isoformat(),
            "seconds": round(stats.seconds, 3),
            "run_id": run_id,
            "previous": None
            if previous is None
            else {k: previous.get(k) for k in ("batch", "file", "sha256", "run_id")},
        }
        body = json.dumps(manifest, indent=2).encode()
        with conn.transaction():
            conn.execute("SELECT 1")  # still connected, so still holding the table's lock
        # create-only: a run that lost the table's lock (its session died) and another that
        # took it cannot both commit this batch number
        outcome = commit_create_only(sink, run_id, manifest_rel, body)
        committed, e = outcome.done, outcome.error
        if outcome.taken_by:
            raise IncrementalError(
                f"{where}: {outcome.taken_by} committed this batch while this run was publishing "
                "(this run's lock on the table was lost with its session), so this run's data "
                f"file is discarded: {e}"
            ) from e
        if committed is None:
            raise IncrementalError(
                f"publishing the manifest of {where} failed and the lake could not be read "
                f"back to tell whether it happened ({e}); {data_rel} is kept, and the next "
                f"run settles it (it finds batch {batch} committed, or writes it again)"
            ) from e
        if not committed:
            raise IncrementalError(
                f"publishing the manifest of {where} failed, so the batch is not committed "
                f"(the next run writes batch {batch} again): {e}"
            ) from e
    except BaseException:
        if staging is not None:
            sink.discard(staging)
        if committed is False and body is not None:  # interrupted in the commit: look
            committed = commit_state(sink, manifest_rel, body)
        if committed is False and data_rel is not None:
            try:
                sink.delete(data_rel)  # not committed: take our data file back out
            except Exception:
                pass  # an orphan; the run that commits this batch removes it
        raise
    _remove_other_versions(sink, paths, batch, version, codec.extension)
    return BatchResult(batch, stats, info, bounds, cap, published, manifest, previous)


# -- the sensor's poll ----------------------------------------------------------------------


@dataclass(frozen=True)
class Poll:
    candidate: str | None  # the newest cursor value a batch could take now
    newest: str | None  # the newest cursor value of all
    newer: bool  # a batch could take rows above the watermark
    waiting: bool  # rows above the watermark exist, but the cap keeps them for later
    cap: Cap


def poll(
    conn: psycopg.Connection,
    *,
    table: QualifiedName,
    cursor: str,
    kind: CursorKind,
    after: str | None,
    timezone: str = "UTC",
    margin_s: float = MARGIN_S,
) -> Poll:
    """Is there anything a batch could take above `after`? Two cheap statements on an
    autocommit connection: the open transactions, then two indexed max(cursor) probes (below
    the cap, and overall). A trigger only: the batch decides again, in its own snapshot."""
    cap = read_cap(conn, kind, margin_s)
    c, t = sql.Identifier(cursor), table.identifier
    bound = _bound(kind, cap, timezone)
    capped = sql.SQL("SELECT max({}) FROM {}").format(c, t)
    if cap.hold:
        capped = sql.SQL("SELECT NULL::{}").format(_CAST[kind])
    elif bound is not None:
        capped = sql.SQL("SELECT max({}) FROM {} WHERE {} <= {}").format(c, t, c, bound)

    def above(v: str) -> sql.Composable:
        if after is None:
            return sql.SQL("{} IS NOT NULL").format(sql.Identifier(v))
        return sql.SQL("coalesce({} > {}, false)").format(sql.Identifier(v), _value(kind, after))

    row = conn.execute(
        sql.SQL(
            "SELECT {}, {}, {}, {} FROM (SELECT ({}) AS cand, (SELECT max({}) FROM {}) AS v) s"
        ).format(
            _text(kind, sql.Identifier("cand")),
            _text(kind, sql.Identifier("v")),
            above("cand"),
            above("v"),
            capped,
            c,
            t,
        )  # fmt: skip
    ).fetchone()
    assert row is not None
    candidate, newest, newer, any_above = row
    return Poll(candidate, newest, bool(newer), bool(any_above) and not newer, cap)

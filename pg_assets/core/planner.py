"""From a Dagster day to the cheapest correct `COPY` for it, and keeping it correct under DDL.

PostgreSQL refuses `COPY partitioned_table TO`, and a `SELECT ... WHERE` on the parent costs
a planner pass over every partition. So we read the partition tree from the catalog once and
pick, for each day:

    exact_child     one plain child holds exactly [day, day+1)  → COPY child (cols) TO STDOUT
    covering_child  one child's range contains the day (monthly, sub-partitioned)
                                                                → COPY (SELECT cols FROM child WHERE …)
    parent_filter   anything else: not partitioned, partitioned on another key, the day split
                    over children or living in the DEFAULT partition
                                                                → COPY (SELECT cols FROM parent WHERE …)

Columns are always listed explicitly in the parent's order, because an attached child may
store them in another order. Day bounds are midnight to midnight in the table's time zone
for `timestamptz` columns (23 or 25 hours on DST days), plain midnights for `date` and
`timestamp`. The partition column's type is recognised by OID, through any domains, so
`timestamptz(3)`, `timestamp(0)` or a domain over `date` plan like their base type.

Catalog cost: `describe_table` runs two statements whatever the number of children (one for
the table and its columns, one for every child with its bounds cast by PostgreSQL), so a
ranged run describes a table once and plans each day from memory.

Concurrent DDL: a plan made from an earlier catalog read can go stale (a child detached,
dropped, truncated). `lock_plan` runs at the start of each day's REPEATABLE READ transaction,
before its snapshot exists: it takes ACCESS SHARE locks on what the plan reads (DETACH and
DROP of a partition need ACCESS EXCLUSIVE on the parent, TRUNCATE on the child, so none of
them can run until the day commits), then its first snapshot-taking query checks that the
catalog still matches the plan and re-plans from a fresh read in the same snapshot if not.
"""

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from pg_assets.core.identifiers import QualifiedName, quote_ident
from pg_assets.core.session import PINNED_SETTINGS, check_settings

PartitionKind = Literal["date", "timestamp", "timestamptz"]
Strategy = Literal["exact_child", "covering_child", "parent_filter"]

# Built-in type OIDs (fixed in pg_type.dat); domains are resolved to these first.
_KIND_BY_OID: dict[int, PartitionKind] = {1082: "date", 1114: "timestamp", 1184: "timestamptz"}
COPY_OPTIONS = sql.SQL("(FORMAT csv, HEADER)")
_UNLOCKABLE = ("m", "f")  # LOCK TABLE refuses materialized views and foreign tables


class CatalogError(LookupError):
    """The configured table or column does not exist, or cannot be split by day.

    `key` names the config key at fault ("table" or "partition_column").
    """

    def __init__(self, message: str, key: str = "table") -> None:
        super().__init__(message)
        self.key = key


class ConcurrentChangeError(RuntimeError):
    """DDL on a relation the plan reads got in the way; nothing was read, retrying is safe."""

    def __init__(self, message: str, relation: QualifiedName) -> None:
        super().__init__(message)
        self.relation = relation


class LockTimeoutError(ConcurrentChangeError):
    """A relation stayed locked by another session (DDL) for longer than `lock_timeout_s`."""

    def __init__(self, message: str, relation: QualifiedName, lock_timeout_s: float) -> None:
        super().__init__(message, relation)
        self.lock_timeout_s = lock_timeout_s


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(), e.g. "numeric(12,2)"


@dataclass(frozen=True)
class Child:
    name: QualifiedName
    is_default: bool
    is_plain: bool  # an ordinary table: `COPY child TO` works (not partitioned, not foreign)
    lower: Any | None  # None = MINVALUE (or DEFAULT, or below year 1)
    upper: Any | None  # None = MAXVALUE (or DEFAULT, or beyond year 9999)
    oid: int = 0
    relkind: str = "r"
    readable: bool = True  # this role may SELECT from the child itself, not only via the parent
    key: str = ""  # xmins of its pg_inherits and pg_class rows (_CHILD_KEY)


@dataclass(frozen=True)
class TableInfo:
    name: QualifiedName
    columns: tuple[Column, ...]
    partition_column: Column
    kind: PartitionKind
    is_partitioned: bool
    ranged_on_column: bool  # RANGE-partitioned on exactly the partition column
    children: tuple[Child, ...]
    oid: int = 0
    relkind: str = "r"
    has_generated_columns: bool = False  # `COPY rel (cols) TO` refuses generated columns
    # sha256 of the catalog rows the plan depends on, computed by PostgreSQL (_COLUMNS_FP,
    # _CHILDREN_FP); lock_plan compares them with the catalog inside each day's snapshot.
    columns_fingerprint: str | None = None
    children_fingerprint: str | None = None

    def lowest_bound(self) -> Any | None:
        lows = [c.lower for c in self.children if not c.is_default and c.lower is not None]
        return min(lows) if lows else None


@dataclass(frozen=True)
class CopyPlan:
    statement: sql.Composed
    relation: QualifiedName
    strategy: Strategy
    lower: Any
    upper: Any
    # What the plan was made from; after lock_plan, `info` is the catalog the COPY will see
    # (use its columns for the manifest).
    info: TableInfo = field(repr=False, compare=False)
    day: dt.date = dt.date.min
    timezone: str = "UTC"


# --- catalog reads ------------------------------------------------------------------------

_COLUMNS_FP = """(
SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(pg_catalog.string_agg(
         fa.attnum::text || ' ' || pg_catalog.quote_ident(fa.attname) || ' '
         || fa.atttypid::text || ' ' || fa.atttypmod::text || ' ' || fa.attgenerated::text,
         E'\\n' ORDER BY fa.attnum), 'UTF8')), 'hex')
FROM pg_catalog.pg_attribute fa
WHERE fa.attrelid = {oid} AND fa.attnum > 0 AND NOT fa.attisdropped)"""

# Attached children by identity, not content: a DETACH/ATTACH replaces the pg_inherits row,
# and a rename, TRUNCATE or bound change rewrites the pg_class row, so their xmins move.
# Cheap (no text, no deparsing: pg_get_expr() would briefly lock every child).
_CHILD_KEY = "fi.xmin::text || ':' || fc.xmin::text"
_CHILDREN_FP = (
    """(
SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(pg_catalog.string_agg(
         fi.inhrelid::text || ':' || """
    + _CHILD_KEY
    + """, ',' ORDER BY fi.inhrelid), 'UTF8')), 'hex')
FROM pg_catalog.pg_inherits fi
JOIN pg_catalog.pg_class fc ON fc.oid = fi.inhrelid
WHERE fi.inhparent = {oid} AND NOT fi.inhdetachpending)"""
)

# One row per column (attnum NULL for a table without columns). `base_type` follows domains
# (nested ones too) down to the built-in type, for the partition column only.
_TABLE_SQL = sql.SQL("""
SELECT c.oid, c.relkind, pt.partstrat, pt.partnatts, pt.partattrs[0] AS partattr,
       a.attnum, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attgenerated,
       CASE WHEN a.attname = %(column)s THEN (
         WITH RECURSIVE d(oid, typtype, typbasetype) AS (
           SELECT t.oid, t.typtype, t.typbasetype FROM pg_catalog.pg_type t
           WHERE t.oid = a.atttypid
           UNION ALL
           SELECT t.oid, t.typtype, t.typbasetype FROM pg_catalog.pg_type t
           JOIN d ON t.oid = d.typbasetype WHERE d.typtype = 'd')
         SELECT d.oid FROM d WHERE d.typtype <> 'd') END AS base_type,
       {columns_fp}
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_partitioned_table pt ON pt.partrelid = c.oid
LEFT JOIN pg_catalog.pg_attribute a
       ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = %(schema)s AND c.relname = %(name)s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
ORDER BY a.attnum
""").format(columns_fp=sql.SQL(_COLUMNS_FP).format(oid=sql.SQL("c.oid")))

# Every attached child with its bounds, cast back to the column's type by PostgreSQL itself
# (the bound text comes from the type's output function in this same session, so the round
# trip is exact; it is fetched in binary, so no client-side parsing of dates is involved).
# Bounds outside the years Python can hold are folded into `sign` (-1 below, +1 above).
# MATERIALIZED: each expression is computed once per child, not once per reference.
_CHILDREN_SQL = """
WITH ch AS MATERIALIZED (
  SELECT fc.oid, n.nspname, fc.relname, fc.relkind,
         pg_catalog.pg_get_expr(fc.relpartbound, fc.oid) AS bound,
         pg_catalog.has_table_privilege(fc.oid, 'SELECT') AS readable,
         {key} AS key
  FROM pg_catalog.pg_inherits fi
  JOIN pg_catalog.pg_class fc ON fc.oid = fi.inhrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = fc.relnamespace
  WHERE fi.inhparent = %(oid)s AND NOT fi.inhdetachpending
), m AS MATERIALIZED (
  SELECT ch.*,
         pg_catalog.regexp_match(bound, '^FOR VALUES FROM \\((.*)\\) TO \\((.*)\\)$') AS m
  FROM ch
), v AS MATERIALIZED (
  SELECT m.*,
    CASE WHEN m.m[1] IS NULL OR m.m[1] = 'MINVALUE' THEN NULL
         ELSE pg_catalog.replace(pg_catalog.substr(m.m[1], 2, length(m.m[1]) - 2),
                                 '''''', '''')::{t} END AS lo,
    CASE WHEN m.m[2] IS NULL OR m.m[2] = 'MAXVALUE' THEN NULL
         ELSE pg_catalog.replace(pg_catalog.substr(m.m[2], 2, length(m.m[2]) - 2),
                                 '''''', '''')::{t} END AS hi
  FROM m
)
SELECT oid, nspname, relname, relkind, bound, readable, m IS NOT NULL AS ranged,
       CASE WHEN lo < {min} THEN -1 WHEN lo > {max} THEN 1 ELSE 0 END AS lo_sign,
       CASE WHEN lo >= {min} AND lo <= {max} THEN lo END AS lo,
       CASE WHEN hi < {min} THEN -1 WHEN hi > {max} THEN 1 ELSE 0 END AS hi_sign,
       CASE WHEN hi >= {min} AND hi <= {max} THEN hi END AS hi,
       {fp} AS children_fingerprint, key
FROM v
ORDER BY relname
"""

# Python's datetime holds years 1..9999; keep a day of margin for time zone shifts.
_LIMITS = {
    "date": ("'0001-01-02'::date", "'9999-12-30'::date"),
    "timestamp": ("'0001-01-02'::timestamp", "'9999-12-30'::timestamp"),
    "timestamptz": ("'0001-01-02 00:00+00'::timestamptz", "'9999-12-30 00:00+00'::timestamptz"),
}
_TYPE_NAME = {"date": "date", "timestamp": "timestamp", "timestamptz": "timestamptz"}


def _children_sql(kind: PartitionKind) -> sql.Composed:
    lo, hi = _LIMITS[kind]
    return sql.SQL(_CHILDREN_SQL).format(
        t=sql.SQL(_TYPE_NAME[kind]),
        min=sql.SQL(lo),
        max=sql.SQL(hi),
        fp=sql.SQL(_CHILDREN_FP).format(oid=sql.SQL("%(oid)s")),
        key=sql.SQL(_CHILD_KEY),
    )


def describe_table(conn: psycopg.Connection, name: QualifiedName, column: str) -> TableInfo:
    """Read what the planner needs from the catalog in at most two statements.

    Errors name the table and column. Run it on a pg_assets session (DateStyle ISO is
    needed to read bounds of `timestamptz` partitions back exactly).
    """
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            _TABLE_SQL, {"schema": name.schema, "name": name.name, "column": column}
        ).fetchall()
        if not rows:
            raise CatalogError(f"table {name} does not exist (or is not visible to this role)")
        oid, relkind, partstrat, partnatts, partattr = rows[0][:5]
        columns_fp = rows[0][10]
        cols = [(r[5], r[6], r[7], r[8], r[9]) for r in rows if r[5] is not None]
        by_name = {n: (num, t, base) for num, n, t, _, base in cols}
        if column not in by_name:
            listed = ", ".join(quote_ident(n) for n in by_name)
            raise CatalogError(
                f"table {name} has no column {quote_ident(column)} (columns: {listed})",
                "partition_column",
            )
        attnum, coltype, base_type = by_name[column]
        kind = _KIND_BY_OID.get(base_type)
        if kind is None:
            raise CatalogError(
                f"column {quote_ident(column)} of table {name} has type {coltype}, which "
                "cannot be split by day; use a date, timestamp or timestamptz column "
                "(or a domain over one)",
                "partition_column",
            )
        is_partitioned = relkind == "p"
        ranged = is_partitioned and partstrat == "r" and partnatts == 1 and partattr == attnum
        children: list[Child] = []
        children_fp = None
        if ranged:
            # Children of a table partitioned on something else never decide a plan.
            for row in cur.execute(_children_sql(kind), {"oid": oid}, binary=True):
                child = _child(name, kind, row)
                children_fp = row[11]
                if child is not None:
                    children.append(child)
    return TableInfo(
        name=name,
        columns=tuple(Column(n, t) for _, n, t, _, _ in cols),
        partition_column=Column(column, coltype),
        kind=kind,
        is_partitioned=is_partitioned,
        ranged_on_column=ranged,
        children=tuple(children),
        oid=oid,
        relkind=relkind,
        has_generated_columns=any(g for _, _, _, g, _ in cols),
        columns_fingerprint=columns_fp,
        children_fingerprint=children_fp,
    )


def _child(parent: QualifiedName, kind: PartitionKind, row: Sequence[Any]) -> Child | None:
    (oid, schema, rel, relkind, bound, readable, is_range, lo_sign, lo, hi_sign, hi) = row[:11]
    key = row[12]
    name = QualifiedName(schema, rel)
    if bound == "DEFAULT":
        return Child(name, True, relkind == "r", None, None, oid, relkind, readable, key)
    if not is_range:
        raise CatalogError(f"cannot read the bound of partition {name} of {parent}: {bound!r}")
    if lo_sign > 0 or hi_sign < 0:
        return None  # wholly outside the days a Python date can name: never covers one
    return Child(
        name, False, relkind == "r", lo if lo_sign == 0 else None, hi if hi_sign == 0 else None,
        oid, relkind, readable, key,
    )  # fmt: skip


# --- planning -----------------------------------------------------------------------------


def day_bounds(kind: PartitionKind, day: dt.date, timezone: str) -> tuple[Any, Any]:
    """[lower, upper) of `day` in the column's own type."""
    nxt = day + dt.timedelta(days=1)
    if kind == "date":
        return day, nxt
    midnight = dt.time(0, 0)
    if kind == "timestamp":
        return dt.datetime.combine(day, midnight), dt.datetime.combine(nxt, midnight)
    tz = ZoneInfo(timezone)
    return (
        dt.datetime.combine(day, midnight, tzinfo=tz),
        dt.datetime.combine(nxt, midnight, tzinfo=tz),
    )


def first_day(info: TableInfo, timezone: str) -> dt.date | None:
    """The day of the lowest partition bound, in the table's time zone."""
    low = info.lowest_bound()
    if low is None:
        return None
    if isinstance(low, dt.datetime):
        if low.tzinfo is not None:
            low = low.astimezone(ZoneInfo(timezone))
        return low.date()
    return low


def _covers(child: Child, lo: Any, hi: Any) -> bool:
    return (child.lower is None or child.lower <= lo) and (child.upper is None or child.upper >= hi)


def _overlaps(child: Child, lo: Any, hi: Any) -> bool:
    return child.is_default or (
        (child.lower is None or child.lower < hi) and (child.upper is None or child.upper > lo)
    )


def plan_day(info: TableInfo, day: dt.date, timezone: str) -> CopyPlan:
    lo, hi = day_bounds(info.kind, day, timezone)
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in info.columns)
    pcol = sql.Identifier(info.partition_column.name)
    covering = [
        c
        for c in info.children
        if info.ranged_on_column and not c.is_default and c.readable and _covers(c, lo, hi)
    ]
    if covering:
        child = covering[0]
        if child.is_plain and (child.lower, child.upper) == (lo, hi):
            if info.has_generated_columns:
                stmt = sql.SQL("COPY (SELECT {cols} FROM {rel}) TO STDOUT {opts}")
            else:
                stmt = sql.SQL("COPY {rel} ({cols}) TO STDOUT {opts}")
            stmt = stmt.format(rel=child.name.identifier, cols=cols, opts=COPY_OPTIONS)
            return CopyPlan(stmt, child.name, "exact_child", lo, hi, info, day, timezone)
        relation, strategy = child.name, "covering_child"
    else:
        relation, strategy = info.name, "parent_filter"
    stmt = sql.SQL(
        "COPY (SELECT {cols} FROM {rel} WHERE {pcol} >= {lo} AND {pcol} < {hi}) TO STDOUT {opts}"
    ).format(
        cols=cols,
        rel=relation.identifier,
        pcol=pcol,
        lo=sql.Literal(lo),
        hi=sql.Literal(hi),
        opts=COPY_OPTIONS,
    )
    return CopyPlan(stmt, relation, strategy, lo, hi, info, day, timezone)  # type: ignore[arg-type]


# --- keeping a plan true until its COPY ---------------------------------------------------


@dataclass(frozen=True)
class _Target:
    name: QualifiedName
    only: bool  # LOCK TABLE ONLY: the relation itself, not its partitions / inheritors


def lock_targets(info: TableInfo, plan: CopyPlan) -> list[_Target]:
    """What `plan` reads, as LOCK TABLE targets (first one: the configured table)."""
    if info.relkind in _UNLOCKABLE:
        return []
    if plan.strategy != "parent_filter":
        child = next((c for c in info.children if c.name == plan.relation), None)
        targets = [_Target(info.name, only=True)]
        if child is None or child.relkind not in _UNLOCKABLE:
            targets.append(_Target(plan.relation, only=False))
        return targets
    if not info.ranged_on_column:
        # partitioned on another key, plain inheritance, a view: the whole tree may hold rows
        return [_Target(info.name, only=False)]
    # Only the children that can hold rows of the day (and DEFAULT). Locking the parent
    # itself blocks DETACH/DROP of any child; a new ATTACH must lock DEFAULT, which we hold.
    read = [c for c in info.children if _overlaps(c, plan.lower, plan.upper)]
    if not all(c.readable for c in read):
        # LOCK needs privileges on each table it names, but not on the partitions it reaches
        # through their parent: lock the whole tree.
        return [_Target(info.name, only=False)]
    return [_Target(info.name, only=True)] + [
        _Target(c.name, only=False) for c in read if c.relkind not in _UNLOCKABLE
    ]


def _lock_sql(targets: Sequence[_Target]) -> sql.Composed:
    return sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
        sql.SQL(", ").join(
            sql.SQL("ONLY {}").format(t.name.identifier) if t.only else t.name.identifier
            for t in targets
        )
    )


def _timeout_error(
    conn: psycopg.Connection, targets: Sequence[_Target], lock_timeout_s: float, where: str
) -> LockTimeoutError:
    """Name the relation another session holds (one query; the transaction is failing)."""
    held: tuple[Any, ...] | None = None
    try:
        held = conn.execute(
            """
            SELECT n.nspname, c.relname, l.granted, l.pid
            FROM pg_catalog.pg_locks l
            JOIN pg_catalog.pg_class c ON c.oid = l.relation
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE l.mode = 'AccessExclusiveLock' AND l.pid <> pg_catalog.pg_backend_pid()
              AND (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
            ORDER BY l.granted DESC
            LIMIT 1
            """,
            ([t.name.schema for t in targets], [t.name.name for t in targets]),
        ).fetchone()
    except psycopg.Error:
        held = None
    if held:
        relation = QualifiedName(held[0], held[1])
        how = "held" if held[2] else "queued for"
        by = f"; an ACCESS EXCLUSIVE lock on it is {how} by backend pid {held[3]}"
    else:
        relation, by = targets[0].name, ""
    return LockTimeoutError(
        f"{where}: could not lock {relation} (ACCESS SHARE) within lock_timeout_s="
        f"{lock_timeout_s:g}{by}: DDL such as DETACH, DROP, TRUNCATE or ALTER is running on "
        "it; nothing was read, retry later or raise lock_timeout_s",
        relation,
        lock_timeout_s,
    )


_VERIFY_SQL = sql.SQL("""
SELECT (SELECT c.oid FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(schema)s AND c.relname = %(name)s),
       {columns_fp},
       (SELECT {key} FROM pg_catalog.pg_inherits fi
        JOIN pg_catalog.pg_class fc ON fc.oid = fi.inhrelid
        WHERE fi.inhrelid = %(child)s AND fi.inhparent = %(oid)s AND NOT fi.inhdetachpending),
       CASE WHEN %(all_children)s THEN {children_fp} END,
       {settings}
""").format(
    columns_fp=sql.SQL(_COLUMNS_FP).format(oid=sql.SQL("%(oid)s")),
    key=sql.SQL(_CHILD_KEY),
    children_fp=sql.SQL(_CHILDREN_FP).format(oid=sql.SQL("%(oid)s")),
    settings=sql.SQL(", ").join(
        sql.SQL("pg_catalog.current_setting({})").format(sql.Literal(k)) for k in PINNED_SETTINGS
    ),
)

# the relation itself, and its partitions: pg_partition_tree returns nothing for a plain table
_STALE_SQL = """
SELECT n.nspname, c.relname
FROM unnest(%s::oid[]) r(oid)
CROSS JOIN LATERAL (SELECT r.oid AS relid
                    UNION SELECT p.relid FROM pg_catalog.pg_partition_tree(r.oid) p) t
JOIN pg_catalog.pg_class c ON c.oid = t.relid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relfilenode <> 0
  AND c.relfilenode IS DISTINCT FROM pg_catalog.pg_relation_filenode(c.oid)
LIMIT 1
"""


def _lock_in_savepoint(
    cur: psycopg.Cursor[Any], targets: Sequence[_Target]
) -> psycopg.errors.LockNotAvailable | psycopg.errors.UndefinedTable | None:
    """LOCK `targets` in one round trip inside a savepoint. On a lock timeout or a missing
    relation the savepoint is rolled back (the transaction stays usable, the locks taken
    before it stay held) and the error is returned."""
    try:
        cur.execute(
            sql.SQL("SAVEPOINT pg_assets_lock; {}; RELEASE SAVEPOINT pg_assets_lock").format(
                _lock_sql(targets)
            )
        )
        return None
    except (psycopg.errors.LockNotAvailable, psycopg.errors.UndefinedTable) as e:
        cur.execute("ROLLBACK TO SAVEPOINT pg_assets_lock; RELEASE SAVEPOINT pg_assets_lock")
        return e


def lock_plan(
    conn: psycopg.Connection, info: TableInfo, plan: CopyPlan, lock_timeout_s: float
) -> CopyPlan:
    """Make `plan` (from `plan_day(info, …)`) hold for the rest of this transaction.

    Call it first thing in the day's REPEATABLE READ transaction, before any statement that
    takes the snapshot (any SELECT, including pg_current_snapshot() or an advisory lock):
      1. `SET LOCAL lock_timeout` and `LOCK TABLE … IN ACCESS SHARE MODE` on what the plan
         reads; neither takes the snapshot, so the snapshot taken next is at least as new
         as every DDL that committed on those relations, and later DDL waits for our commit.
      2. One snapshot-taking query checks the catalog against `info` (same table OID, same
         columns, same attached children with the same bounds) and that the session uses
         PINNED_SETTINGS.
      3. If the catalog changed, the table is described again inside this snapshot and the
         day re-planned; relations the new plan reads that were not locked in step 1 are
         locked now and checked not to have been truncated or rewritten since the snapshot.

    Returns the plan to COPY; its `info` is the catalog that plan was made from (the given
    `info` when nothing changed: keep using `plan.info` for the next days of a ranged run).
    Raises LockTimeoutError (naming the relation and `lock_timeout_s`), ConcurrentChangeError
    (a double race; nothing was read, retry the day), CatalogError (table or column gone) or
    SessionSettingsError. Three round trips when the plan holds, whatever the number of
    partitions.
    """
    if lock_timeout_s <= 0:
        raise ValueError("lock_timeout_s must be > 0: nothing waits forever")
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("lock_plan must run inside the day's transaction (locks end with it)")
    where = f"table {info.name}, day {plan.day.isoformat()}"
    targets = lock_targets(info, plan)
    timeout = sql.SQL("SET LOCAL lock_timeout = {}").format(
        sql.Literal(f"{max(1, round(lock_timeout_s * 1000))}ms")
    )
    locked: set[_Target] = set()
    with conn.cursor(row_factory=tuple_row) as cur:
        # Round trip 1 (simple-query protocol; neither statement takes the snapshot). The
        # configured table is locked outside the savepoint: if it is gone, the day is.
        try:
            if targets:
                cur.execute(sql.SQL("{}; {}").format(timeout, _lock_sql(targets[:1])))
                locked.add(targets[0])
            else:
                cur.execute(timeout)
        except psycopg.errors.LockNotAvailable:
            raise _timeout_error(conn, targets[:1], lock_timeout_s, where) from None
        except psycopg.errors.UndefinedTable:
            raise CatalogError(
                f"table {info.name} does not exist (or is not visible to this role)"
            ) from None
        # Round trip 2: the partitions read. One dropped since `info` was read is not fatal:
        # the check below sees it and re-plans.
        if targets[1:]:
            error = _lock_in_savepoint(cur, targets[1:])
            if isinstance(error, psycopg.errors.LockNotAvailable):
                raise _timeout_error(conn, targets[1:], lock_timeout_s, where)
            if error is None:
                locked.update(targets[1:])

        # Round trip 3: takes the snapshot. Costs the same whatever the number of children,
        # except for a parent_filter day of a table ranged on the column, which depends on
        # which children overlap the day.
        child = next((c for c in info.children if c.name == plan.relation), None)
        all_children = plan.strategy == "parent_filter" and info.ranged_on_column
        row = cur.execute(
            _VERIFY_SQL,
            {
                "schema": info.name.schema,
                "name": info.name.name,
                "oid": info.oid,
                "child": child.oid if child else None,
                "all_children": all_children,
            },
        ).fetchone()
        assert row is not None
        check_settings(tuple(row[4:]))
        unchanged = (
            row[0] == info.oid
            and row[1] == info.columns_fingerprint
            and (child is None or row[2] == child.key)
            and (not all_children or row[3] == info.children_fingerprint)
        )
        if unchanged and len(locked) == len(targets):
            return plan

        try:
            fresh = describe_table(conn, info.name, info.partition_column.name)
        except psycopg.errors.LockNotAvailable:
            # reading bounds briefly locks each partition (pg_get_expr opens it)
            raise LockTimeoutError(
                f"{where}: the partitions of {info.name} changed and re-reading them waited "
                f"longer than lock_timeout_s={lock_timeout_s:g}: DDL is running on one of "
                "them; nothing was read, retry later or raise lock_timeout_s",
                info.name,
                lock_timeout_s,
            ) from None
        new = plan_day(fresh, plan.day, plan.timezone)
        extra = [t for t in lock_targets(fresh, new) if t not in locked]
        if extra:
            error = _lock_in_savepoint(cur, extra)
            if isinstance(error, psycopg.errors.LockNotAvailable):
                raise _timeout_error(conn, extra, lock_timeout_s, where)
            if error is not None:
                raise ConcurrentChangeError(
                    f"{where}: a relation the plan reads ({', '.join(str(t.name) for t in extra)})"
                    " was dropped while the day was being planned; nothing was read, retry",
                    extra[0].name,
                )
            _check_not_rewritten(cur, extra, where)
        return new


def rewritten_since_snapshot(
    cur: psycopg.Cursor[Any], names: Sequence[QualifiedName]
) -> QualifiedName | None:
    """The first of `names` (or of their partitions) truncated or rewritten after this
    transaction's snapshot, or None. For relations locked after the snapshot was taken:
    TRUNCATE and table rewrites are not MVCC-safe, so one committed between the snapshot and
    the lock would make the data look empty. It shows as a relfilenode that differs between
    the snapshot's pg_class and the current catalog (which the lock made current)."""
    oids = [
        r[0]
        for r in cur.execute(
            "SELECT c.oid FROM pg_catalog.pg_class c"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([n.schema for n in names], [n.name for n in names]),
        ).fetchall()
    ]
    stale = cur.execute(_STALE_SQL, (oids,)).fetchone()
    return QualifiedName(stale[0], stale[1]) if stale else None


def _check_not_rewritten(cur: psycopg.Cursor[Any], targets: Sequence[_Target], where: str) -> None:
    relation = rewritten_since_snapshot(cur, [t.name for t in targets])
    if relation is not None:
        raise ConcurrentChangeError(
            f"{where}: {relation} was truncated or rewritten while the day was being planned; "
            "nothing was read, retry",
            relation,
        )

"""From a Dagster day to the cheapest correct `COPY` for it.

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
`timestamp`.
"""

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from pg_assets.core.identifiers import QualifiedName

PartitionKind = Literal["date", "timestamp", "timestamptz"]
_KINDS: dict[str, PartitionKind] = {
    "date": "date",
    "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamptz",
}
_CAST = {k: sql.SQL(k) for k in ("date", "timestamp", "timestamptz")}
_RANGE = re.compile(r"^FOR VALUES FROM \((.+)\) TO \((.+)\)$", re.S)
COPY_OPTIONS = sql.SQL("(FORMAT csv, HEADER)")


class CatalogError(LookupError):
    """The configured table or column does not exist, or cannot be split by day.

    `key` names the config key at fault ("table" or "partition_column").
    """

    def __init__(self, message: str, key: str = "table") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(), e.g. "numeric(12,2)"


@dataclass(frozen=True)
class Child:
    name: QualifiedName
    is_default: bool
    is_plain: bool  # an ordinary table: `COPY child TO` works (not partitioned, not foreign)
    lower: Any | None  # None = MINVALUE (or DEFAULT)
    upper: Any | None  # None = MAXVALUE (or DEFAULT)


@dataclass(frozen=True)
class TableInfo:
    name: QualifiedName
    columns: tuple[Column, ...]
    partition_column: Column
    kind: PartitionKind
    is_partitioned: bool
    ranged_on_column: bool  # RANGE-partitioned on exactly the partition column
    children: tuple[Child, ...]

    def lowest_bound(self) -> Any | None:
        lows = [c.lower for c in self.children if not c.is_default and c.lower is not None]
        return min(lows) if lows else None


@dataclass(frozen=True)
class CopyPlan:
    statement: sql.Composed
    relation: QualifiedName
    strategy: Literal["exact_child", "covering_child", "parent_filter"]
    lower: Any
    upper: Any


_TABLE_SQL = """
SELECT c.oid, c.relkind,
       pt.partstrat, pt.partnatts, pt.partattrs[0] AS partattr
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""

_COLUMNS_SQL = """
SELECT attnum, attname, format_type(atttypid, atttypmod)
FROM pg_attribute
WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped
ORDER BY attnum
"""

_CHILDREN_SQL = """
SELECT n.nspname, c.relname, c.relkind, pg_get_expr(c.relpartbound, c.oid)
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.inhparent = %s
ORDER BY c.relname
"""


def _literal(text: str) -> str | None:
    text = text.strip()
    if text in ("MINVALUE", "MAXVALUE"):
        return None
    if text.startswith("'") and text.endswith("'"):
        return text[1:-1].replace("''", "'")
    raise CatalogError(f"unexpected partition bound literal {text!r}")


def describe_table(conn: psycopg.Connection, name: QualifiedName, column: str) -> TableInfo:
    """Read what the planner needs from the catalog; errors name the table and column."""
    with conn.cursor() as cur:
        row = cur.execute(_TABLE_SQL, (name.schema, name.name)).fetchone()
        if row is None:
            raise CatalogError(f"table {name} does not exist (or is not visible to this role)")
        oid, relkind, partstrat, partnatts, partattr = row
        cols = cur.execute(_COLUMNS_SQL, (oid,)).fetchall()
        by_name = {n: (num, t) for num, n, t in cols}
        if column not in by_name:
            raise CatalogError(
                f"table {name} has no column {column!r} (columns: {', '.join(by_name)})",
                "partition_column",
            )
        attnum, coltype = by_name[column]
        kind = _KINDS.get(coltype)
        if kind is None:
            raise CatalogError(
                f"column {column!r} of table {name} has type {coltype}, which cannot be split "
                "by day; use a date, timestamp or timestamptz column",
                "partition_column",
            )
        is_partitioned = relkind == "p"
        ranged = is_partitioned and partstrat == "r" and partnatts == 1 and partattr == attnum
        children: list[Child] = []
        if is_partitioned:
            raw_children = cur.execute(_CHILDREN_SQL, (oid,)).fetchall()
            for schema, rel, kind_, bound in raw_children:
                lower = upper = None
                is_default = bound == "DEFAULT"
                if ranged and not is_default:
                    m = _RANGE.match(bound or "")
                    if not m:
                        raise CatalogError(f"cannot read the bound of partition {rel}: {bound!r}")
                    lo_text, hi_text = _literal(m.group(1)), _literal(m.group(2))
                    # PostgreSQL itself turns the bound literals back into typed values.
                    q = sql.SQL("SELECT %s::{t}, %s::{t}").format(t=_CAST[kind])
                    lower, upper = cur.execute(q, (lo_text, hi_text)).fetchone()  # type: ignore[misc]
                children.append(
                    Child(QualifiedName(schema, rel), is_default, kind_ == "r", lower, upper)
                )
    return TableInfo(
        name=name,
        columns=tuple(Column(n, t) for _, n, t in cols),
        partition_column=Column(column, coltype),
        kind=kind,
        is_partitioned=is_partitioned,
        ranged_on_column=ranged,
        children=tuple(children),
    )


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


def plan_day(info: TableInfo, day: dt.date, timezone: str) -> CopyPlan:
    lo, hi = day_bounds(info.kind, day, timezone)
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in info.columns)
    pcol = sql.Identifier(info.partition_column.name)
    covering = [
        c
        for c in info.children
        if info.ranged_on_column and not c.is_default and _covers(c, lo, hi)
    ]
    if covering:
        child = covering[0]
        if child.is_plain and (child.lower, child.upper) == (lo, hi):
            stmt = sql.SQL("COPY {rel} ({cols}) TO STDOUT {opts}").format(
                rel=child.name.identifier, cols=cols, opts=COPY_OPTIONS
            )
            return CopyPlan(stmt, child.name, "exact_child", lo, hi)
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
    return CopyPlan(stmt, relation, strategy, lo, hi)  # type: ignore[arg-type]


def lock_plan(
    conn: psycopg.Connection, info: TableInfo, plan: CopyPlan, lock_timeout_s: float
) -> CopyPlan:
    """Lock what `plan` reads before the transaction's snapshot is taken (LOCK takes none),
    so DDL on it either committed before the snapshot or waits for the COPY."""
    conn.execute(
        "SELECT set_config('lock_timeout', %s, true)", (f"{int(lock_timeout_s * 1000)}ms",)
    )
    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(plan.relation.identifier))
    return plan

"""The planner against a real catalog: partition columns of every date/time type (type
modifiers, domains), a constant number of catalog statements per table, generated columns,
children the role cannot read, and names printed as PostgreSQL quotes them."""

import datetime as dt
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pg_assets.config import ConfigError
from pg_assets.core.identifiers import QUOTED_KEYWORDS, QualifiedName, quote_ident
from pg_assets.core.planner import describe_table, plan_day
from pg_assets.core.session import connect_kwargs
from pg_assets_tests.conftest import day_query, postgres_copy
from pg_assets_tests.day_files import day_bytes

D = dt.date(2026, 10, 24)
DAYS = [D + dt.timedelta(days=n) for n in range(3)]
TZ = "Europe/Berlin"

# (type of the partition column, kind it plans as)
TYPES = [
    ("date", "date"),
    ("typ.d_date", "date"),  # a domain over date
    ("typ.d_d_date", "date"),  # a domain over that domain
    ("timestamp", "timestamp"),
    ("timestamp(0)", "timestamp"),
    ("timestamp(3)", "timestamp"),
    ("timestamp(6)", "timestamp"),
    ("typ.d_ts0", "timestamp"),  # a domain over timestamp(0)
    ("timestamptz", "timestamptz"),
    ("timestamptz(0)", "timestamptz"),
    ("timestamptz(3)", "timestamptz"),
    ("timestamptz(6)", "timestamptz"),
    ("typ.d_tstz3", "timestamptz"),  # a domain over timestamptz(3)
]


def _table(i: int) -> str:
    return f"t{i}"


@pytest.fixture(scope="module")
def typed(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS typ CASCADE")
        c.execute("CREATE SCHEMA typ")
        c.execute("CREATE DOMAIN typ.d_date AS date CHECK (VALUE > '2000-01-01')")
        c.execute("CREATE DOMAIN typ.d_d_date AS typ.d_date")
        c.execute("CREATE DOMAIN typ.d_ts0 AS timestamp(0)")
        c.execute("CREATE DOMAIN typ.d_tstz3 AS timestamptz(3)")
        for i, (typ, kind) in enumerate(TYPES):
            t = sql.Identifier("typ", _table(i))
            c.execute(
                sql.SQL(
                    "CREATE TABLE {} (id int, at {} NOT NULL, v text) PARTITION BY RANGE (at)"
                ).format(t, sql.SQL(typ))
            )
            for day in DAYS:
                if kind == "timestamptz":  # Berlin midnights: the bounds are not UTC midnights
                    lo = sql.SQL("{}::timestamp AT TIME ZONE {}").format(
                        sql.Literal(day), sql.Literal(TZ)
                    )
                    hi = sql.SQL("{}::timestamp AT TIME ZONE {}").format(
                        sql.Literal(day + dt.timedelta(days=1)), sql.Literal(TZ)
                    )
                else:
                    lo, hi = sql.Literal(day), sql.Literal(day + dt.timedelta(days=1))
                c.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier("typ", f"{_table(i)}_{day:%Y%m%d}"), t, lo, hi
                    )
                )
            # fractional seconds, rounded by the column's own typmod on the way in
            expr = sql.SQL(
                "('2026-10-24 00:00 Europe/Berlin'::timestamptz + g * interval '7 min 1.2345678 s')"
            )
            if kind == "date":
                expr = sql.SQL("({} AT TIME ZONE 'Europe/Berlin')::date").format(expr)
            elif kind == "timestamp":
                expr = sql.SQL("({} AT TIME ZONE 'Europe/Berlin')").format(expr)
            c.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT g, {}, 'v' || g FROM generate_series(0, 600) g"
                ).format(t, expr)
            )


@pytest.mark.parametrize("i", range(len(TYPES)), ids=[t for t, _ in TYPES])
def test_partition_column_types_with_typmods_and_domains(typed, project, db, i):
    typ, kind = TYPES[i]
    tz = TZ if kind == "timestamptz" else "UTC"
    p = project(
        [{"table": f"typ.{_table(i)}", "partition_column": "at", "timezone": tz}],
    )
    assert p.asset().partitions_def.start.date() == DAYS[0]  # read from the bounds
    day = DAYS[1]
    result = p.materialize(day.isoformat())
    assert result.success, typ
    meta = p.metadata(result)
    assert meta["strategy"] == "exact_child"
    assert meta["source_relation"] == f"typ.{_table(i)}_{day:%Y%m%d}"
    expected = postgres_copy(
        db, day_query(sql.Identifier("typ", _table(i)), "at", day, kind, "Europe/Berlin")
    )
    assert expected.count(b"\n") > 100
    assert day_bytes(p.config.bronze.root, day) == expected


class CountingCursor(psycopg.Cursor):
    """Counts the statements sent through it (a real cursor: counting is not mocking)."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> "CountingCursor":
        self.connection.statements += 1  # type: ignore[attr-defined]
        return super().execute(query, params, **kwargs)


def test_describe_costs_two_statements_whatever_the_number_of_children(pg_conninfo):
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS wide CASCADE")
        c.execute("CREATE SCHEMA wide")
        c.execute("CREATE TABLE wide.t (id int, d date NOT NULL) PARTITION BY RANGE (d)")
        c.execute(
            """
            DO $$ BEGIN
              FOR i IN 0..199 LOOP
                EXECUTE format('CREATE TABLE wide.t_%s PARTITION OF wide.t '
                               'FOR VALUES FROM (%L) TO (%L)', i,
                               date '2026-01-01' + i, date '2026-01-01' + i + 1);
              END LOOP;
            END $$
            """
        )
    with psycopg.connect(
        pg_conninfo, cursor_factory=CountingCursor, **connect_kwargs(5, 0)
    ) as conn:
        conn.statements = 0  # type: ignore[attr-defined]
        info = describe_table(conn, QualifiedName("wide", "t"), "d")
        assert conn.statements <= 3  # type: ignore[attr-defined]
    assert len(info.children) == 200
    assert info.lowest_bound() == dt.date(2026, 1, 1)
    plan = plan_day(info, dt.date(2026, 7, 19), "UTC")
    assert (plan.strategy, str(plan.relation)) == ("exact_child", "wide.t_199")


def test_exact_child_with_generated_columns(pg_conninfo, project, db):
    """`COPY child (cols) TO` refuses generated columns; the plan must still work."""
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS gen CASCADE")
        c.execute("CREATE SCHEMA gen")
        c.execute(
            "CREATE TABLE gen.t (id int, d date NOT NULL, "
            "twice int GENERATED ALWAYS AS (id * 2) STORED, "
            "thrice int GENERATED ALWAYS AS (id * 3) VIRTUAL) PARTITION BY RANGE (d)"
        )
        c.execute(
            "CREATE TABLE gen.t_1024 PARTITION OF gen.t FOR VALUES FROM ('2026-10-24') TO "
            "('2026-10-25')"
        )
        c.execute("INSERT INTO gen.t (id, d) SELECT g, '2026-10-24' FROM generate_series(1, 50) g")
    p = project([{"table": "gen.t", "partition_column": "d"}])
    result = p.materialize("2026-10-24")
    assert result.success
    assert p.metadata(result)["strategy"] == "exact_child"
    expected = postgres_copy(db, day_query(sql.Identifier("gen", "t"), "d", D))
    assert expected.startswith(b"id,d,twice,thrice\n")
    assert day_bytes(p.config.bronze.root, D) == expected


def test_child_the_role_cannot_read_is_read_through_the_parent(pg_conninfo, project, monkeypatch):
    """GRANT on a partitioned table does not reach its partitions; a role that may only read
    the parent must still get the day (through the parent), not `permission denied`."""
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS priv CASCADE")
        c.execute("DROP ROLE IF EXISTS assets_parent_only")
        c.execute("CREATE ROLE assets_parent_only LOGIN")
        c.execute("CREATE SCHEMA priv")
        c.execute("CREATE TABLE priv.t (id int, d date NOT NULL) PARTITION BY RANGE (d)")
        c.execute(
            "CREATE TABLE priv.t_1024 PARTITION OF priv.t FOR VALUES FROM ('2026-10-24') TO "
            "('2026-10-25')"
        )
        c.execute("INSERT INTO priv.t SELECT g, '2026-10-24' FROM generate_series(1, 30) g")
        c.execute("GRANT USAGE ON SCHEMA priv TO assets_parent_only")
        c.execute("GRANT SELECT ON priv.t TO assets_parent_only")
        expected = postgres_copy(c, day_query(sql.Identifier("priv", "t"), "d", D))
    try:
        monkeypatch.setenv("PG_ASSETS_CONNINFO", f"{pg_conninfo} user=assets_parent_only")
        p = project([{"table": "priv.t", "partition_column": "d"}])
        result = p.materialize(D.isoformat())
        assert result.success
        assert p.metadata(result)["strategy"] == "parent_filter"
        assert day_bytes(p.config.bronze.root, D) == expected
    finally:
        with psycopg.connect(pg_conninfo, autocommit=True) as c:
            c.execute("DROP SCHEMA priv CASCADE")
            c.execute("DROP ROLE assets_parent_only")


# --- names printed as PostgreSQL quotes them ----------------------------------------------


@pytest.mark.parametrize(
    "name,shown",
    [
        (QualifiedName("public", "orders"), "public.orders"),
        (QualifiedName("Sales Dept", "ol_2024_03_09"), '"Sales Dept".ol_2024_03_09'),
        (
            QualifiedName("public", "flights; DROP TABLE public.flights"),
            'public."flights; DROP TABLE public.flights"',
        ),
        (QualifiedName('Odd "Schema"', "Order Lines"), '"Odd ""Schema"""."Order Lines"'),
        (QualifiedName("public", "Orders"), 'public."Orders"'),
        (QualifiedName("public", "user"), 'public."user"'),  # reserved keyword
        (QualifiedName("public", "plans"), "public.plans"),  # unreserved keyword
        (QualifiedName("public", "a$b"), 'public."a$b"'),
        (QualifiedName("public", "café"), 'public."café"'),
        (QualifiedName("public", "2024"), 'public."2024"'),
    ],
)
def test_names_print_as_postgres_quotes_them(db, name, shown):
    assert str(name) == name.display == shown
    (server,) = db.execute(
        "SELECT quote_ident(%s) || '.' || quote_ident(%s)", (name.schema, name.name)
    ).fetchone()
    assert server == shown


def test_quoted_keywords_match_the_server(db):
    rows = db.execute("SELECT word FROM pg_get_keywords() WHERE catcode <> 'U'").fetchall()
    assert QUOTED_KEYWORDS == {w for (w,) in rows}
    for word in ("select", "user", "plan", "order", "data"):
        (server,) = db.execute("SELECT quote_ident(%s)", (word,)).fetchone()
        assert quote_ident(word) == server


@pytest.mark.parametrize(
    "table,shown",
    [
        ('"Sales Dept".ol_2024_03_09', 'table "Sales Dept".ol_2024_03_09 does not exist'),
        (
            'public."flights; DROP TABLE public.flights"',
            'table public."flights; DROP TABLE public.flights" does not exist',
        ),
    ],
)
def test_errors_print_names_quoted(project, table, shown):
    with pytest.raises(ConfigError) as err:
        project([{"table": table, "partition_column": "d", "start": "2026-10-01"}])
    assert shown in str(err.value)


def test_type_error_names_column_and_type(typed, pg_conninfo, project):
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute('CREATE TABLE IF NOT EXISTS typ."Mixed Case" ("Day Text" text)')
    with pytest.raises(ConfigError) as err:
        project([{"table": 'typ."Mixed Case"', "partition_column": '"Day Text"', "start": D}])
    assert 'column "Day Text" of table typ."Mixed Case" has type text' in str(err.value)

"""The extraction session is pinned: a reader role with its own DateStyle, TimeZone,
IntervalStyle, extra_float_digits, bytea_output, lc_monetary, client_encoding and
quote_all_identifiers lands exactly the bytes the pinned reference produces, and nothing in
the planner or at load trips over its settings."""

import datetime as dt
import os

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.planner import describe_table, lock_plan, plan_day
from pg_assets.core.session import (
    PINNED_SETTINGS,
    SessionSettingsError,
    check_session,
    connect_kwargs,
)
from pg_assets_tests.conftest import day_query, postgres_copy
from pg_assets_tests.day_files import day_bytes, no_day_files

ROLE = "assets_odd_session"
RLS_ROLE = "assets_rls_reader"
D = dt.date(2026, 3, 28)  # the day before Europe's spring DST change
DAYS = [D + dt.timedelta(days=n) for n in range(3)]
ROLE_SETTINGS = {
    "DateStyle": "SQL, DMY",
    "TimeZone": "Asia/Kolkata",
    "IntervalStyle": "sql_standard",
    "extra_float_digits": "0",
    "bytea_output": "escape",
    "lc_monetary": "C.utf8",
    "client_encoding": "LATIN1",
    "quote_all_identifiers": "on",
}


@pytest.fixture(scope="module")
def odd_role(pg_conninfo: str):
    """A role whose own settings change COPY's text output, and tables it may read."""
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS sess CASCADE")
        for role in (ROLE, RLS_ROLE):
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
            c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        available = {r[0] for r in c.execute("SELECT collname FROM pg_collation")}
        for name, value in ROLE_SETTINGS.items():
            if name == "lc_monetary" and value not in available:
                continue
            c.execute(
                sql.SQL("ALTER ROLE {} SET {} = {}").format(
                    sql.Identifier(ROLE), sql.Identifier(name), sql.Literal(value)
                )
            )
        c.execute("CREATE SCHEMA sess")
        # timestamptz, monthly children bounded at Europe/Berlin midnights
        c.execute(
            "CREATE TABLE sess.events (id bigint, at timestamptz NOT NULL, v text) "
            "PARTITION BY RANGE (at)"
        )
        c.execute(
            "CREATE TABLE sess.events_2026_03 PARTITION OF sess.events FOR VALUES "
            "FROM ('2026-03-01 00:00 Europe/Berlin') TO ('2026-04-01 00:00 Europe/Berlin')"
        )
        c.execute(
            "INSERT INTO sess.events SELECT g, '2026-03-27 00:00 Europe/Berlin'::timestamptz "
            "+ g * interval '13 min 0.123456 s', 'caf\u00e9 \u20ac' || g "
            "FROM generate_series(0, 500) g"
        )
        # timestamptz, one child per Europe/Berlin day (the 23-hour DST day included)
        c.execute(
            "CREATE TABLE sess.daily (id bigint, at timestamptz NOT NULL, v text) "
            "PARTITION BY RANGE (at)"
        )
        for day in DAYS:
            c.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF sess.daily FOR VALUES "
                    "FROM ({}::timestamp AT TIME ZONE 'Europe/Berlin') "
                    "TO ({}::timestamp AT TIME ZONE 'Europe/Berlin')"
                ).format(
                    sql.Identifier("sess", f"daily_{day:%Y%m%d}"),
                    sql.Literal(day),
                    sql.Literal(day + dt.timedelta(days=1)),
                )
            )
        c.execute(
            "INSERT INTO sess.daily SELECT * FROM sess.events "
            "WHERE at >= '2026-03-28 00:00 Europe/Berlin' AND at < '2026-03-31 00:00 Europe/Berlin'"
        )
        # every type whose text output depends on a session setting
        c.execute(
            """
            CREATE TABLE sess.vals (
              id int, d date NOT NULL, ts timestamp, tstz timestamptz, t timetz, iv interval,
              f8 float8, f4 real, pt point, b bytea, m money, rc regclass, txt text)
            """
        )
        c.execute(
            """
            INSERT INTO sess.vals SELECT g, date '2026-03-27' + g % 3,
              timestamp '2026-03-28 13:14:15.123456' + g * interval '1 hour',
              timestamptz '2026-03-28 13:14:15.123456+00' + g * interval '1 hour',
              timetz '13:14:15+02', interval '1 year 2 months 3 days 04:05:06.7' * g,
              pi() * g / 7, (pi() * g / 7)::real, point(pi() * g, 1.0 / 3),
              ('\\x00ff' || lpad(to_hex(g), 4, '0') || '5c27')::bytea,
              (g * 1234.56)::numeric::money, 'sess.vals'::regclass, 'na\u00efve \u20ac ' || g
            FROM generate_series(1, 60) g
            """
        )
        c.execute("CREATE TABLE sess.secret (id int, d date NOT NULL)")
        c.execute("INSERT INTO sess.secret SELECT g, '2026-03-28' FROM generate_series(1, 10) g")
        c.execute("ALTER TABLE sess.secret ENABLE ROW LEVEL SECURITY")
        c.execute(f"CREATE POLICY evens ON sess.secret TO {RLS_ROLE} USING (id % 2 = 0)")
        for role in (ROLE, RLS_ROLE):
            c.execute(sql.SQL("GRANT USAGE ON SCHEMA sess TO {}").format(sql.Identifier(role)))
            c.execute(
                sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA sess TO {}").format(
                    sql.Identifier(role)
                )
            )
    yield f"{pg_conninfo} user={ROLE}"
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA sess CASCADE")
        for role in (ROLE, RLS_ROLE):
            c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def pinned_reference(pg_conninfo: str, query: sql.Composable) -> bytes:
    """PostgreSQL's own COPY on a pinned session of the default role."""
    with psycopg.connect(pg_conninfo, **connect_kwargs(5, 0)) as conn:
        return postgres_copy(conn, query)


def role_default_copy(conninfo: str, query: sql.Composable) -> bytes | None:
    """The role's own COPY with its own settings (None when it cannot even encode the data)."""
    try:
        with psycopg.connect(conninfo) as conn:
            return postgres_copy(conn, query)
    except psycopg.Error:
        return None


CASES = [
    # table, column, kind, time zone, day, strategy
    ("events", "at", "timestamptz", "Europe/Berlin", DAYS[1], "covering_child"),  # 23 hours
    ("daily", "at", "timestamptz", "Europe/Berlin", DAYS[1], "exact_child"),
    ("vals", "d", "date", "UTC", DAYS[0], "parent_filter"),
]


@pytest.mark.parametrize("table,column,kind,tz,day,strategy", CASES)
def test_role_settings_do_not_change_bronze_bytes(
    odd_role, pg_conninfo, project, monkeypatch, table, column, kind, tz, day, strategy
):
    query = day_query(sql.Identifier("sess", table), column, day, kind, tz)
    expected = pinned_reference(pg_conninfo, query)
    assert expected.count(b"\n") > 20
    # the role's settings really do change PostgreSQL's output (or cannot encode it)
    assert role_default_copy(odd_role, query) != expected

    monkeypatch.setenv("PG_ASSETS_CONNINFO", odd_role)
    p = project(
        [{"table": f"sess.{table}", "partition_column": column, "timezone": tz, "start": D}]
    )
    result = p.materialize(day.isoformat())
    assert result.success
    assert p.metadata(result)["strategy"] == strategy
    assert day_bytes(p.config.bronze.root, day) == expected


def test_load_and_check_with_the_role(odd_role, project, monkeypatch, tmp_path, capsys):
    """First days are read from timestamptz bounds at load; `pg-assets check` checks."""
    monkeypatch.setenv("PG_ASSETS_CONNINFO", odd_role)
    p = project(
        [
            {"table": "sess.events", "partition_column": "at", "timezone": "Europe/Berlin"},
            {"table": "sess.daily", "partition_column": "at", "timezone": "Europe/Berlin"},
        ]
    )
    starts = [a.partitions_def.start.date() for a in p.defs.assets]  # type: ignore[union-attr]
    assert starts == [dt.date(2026, 3, 1), DAYS[0]]

    from pg_assets.dev.cli import main

    monkeypatch.setenv("PG_ASSETS_CONFIG", str(p.config.path))
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "sess.events: first day 2026-03-01, checked" in out
    assert "unreachable" not in out.lower()


def test_row_level_security_fails_instead_of_filtering(odd_role, pg_conninfo, project, monkeypatch):
    """A role subject to a row-level security policy would silently get half the rows."""
    monkeypatch.setenv("PG_ASSETS_CONNINFO", f"{pg_conninfo} user={RLS_ROLE}")
    p = project([{"table": "sess.secret", "partition_column": "d", "start": "2026-03-01"}])
    result = p.materialize(DAYS[0].isoformat())
    assert not result.success
    failure = str([e.event_specific_data for e in result.all_events if e.is_step_failure])
    assert "row-level security" in failure and "secret" in failure
    assert no_day_files(p.config.bronze.root, DAYS[0])


def test_user_options_are_kept(pg_conninfo):
    conninfo = f"{pg_conninfo} options='-c search_path=sess,public -c DateStyle=German'"
    with psycopg.connect(conninfo, **connect_kwargs(5, 2.5, conninfo, lock_timeout_s=1)) as conn:
        check_session(conn)  # our DateStyle wins over the user's
        assert conn.execute("SHOW search_path").fetchone() == ("sess,public",)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("2500ms",)
        assert conn.execute("SHOW lock_timeout").fetchone() == ("1s",)


def test_every_pin_reaches_the_server(odd_role):
    with psycopg.connect(odd_role, **connect_kwargs(5, 0)) as conn:
        for name, value in PINNED_SETTINGS.items():
            assert conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone() == (
                value,
            )


def test_unpinned_session_is_refused_by_lock_plan(odd_role):
    """A pooler that drops the startup options must not produce role-dependent files."""
    with psycopg.connect(odd_role, **connect_kwargs(5, 0)) as conn:
        info = describe_table(conn, QualifiedName("sess", "daily"), "at")
        conn.rollback()
    plan = plan_day(info, DAYS[1], "Europe/Berlin")
    with psycopg.connect(odd_role) as conn:  # the role's own settings
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with pytest.raises(SessionSettingsError, match=r"DateStyle is 'SQL, DMY'"):
            with conn.transaction():
                lock_plan(conn, info, plan, lock_timeout_s=5)


def test_timestamptz_bounds_read_on_any_session(odd_role):
    """describe_table reads bounds in binary: the role's own DateStyle cannot break it."""
    with psycopg.connect(odd_role) as conn:
        info = describe_table(conn, QualifiedName("sess", "daily"), "at")
    assert plan_day(info, DAYS[1], "Europe/Berlin").strategy == "exact_child"
    assert os.environ.get("PG_ASSETS_CONNINFO") != odd_role

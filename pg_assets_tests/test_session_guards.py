"""What keeps the day's lock alive while it is needed, and what bounds a dead network."""

import datetime as dt

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.session import NETWORK_DEFAULTS, connect_kwargs
from pg_assets.dev.demo_data import create_daily_partitioned
from pg_assets_tests.adls_server import Fault
from pg_assets_tests.conftest import adls_bronze

DAY = dt.date(2026, 10, 8)
NAME = QualifiedName("guard", "orders")
TABLE = {"table": "guard.orders", "partition_column": "order_date", "start": "2026-10-01"}


@pytest.fixture(scope="module")
def orders(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, NAME.schema, NAME.name, [DAY], 2_000)


@pytest.fixture
def impatient_role(db, pg_conninfo) -> str:
    """A reader whose sessions the server ends after one idle second."""
    db.execute("DROP ROLE IF EXISTS impatient_reader")
    db.execute("CREATE ROLE impatient_reader LOGIN")
    db.execute("ALTER ROLE impatient_reader SET idle_session_timeout = '1s'")
    db.execute("GRANT USAGE ON SCHEMA guard TO impatient_reader")
    db.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA guard TO impatient_reader"))
    yield make_conninfo(pg_conninfo, user="impatient_reader")
    db.execute("DROP OWNED BY impatient_reader")
    db.execute("DROP ROLE impatient_reader")


def test_an_idle_session_timeout_cannot_end_the_days_lock(
    orders, adls, project, impatient_role, monkeypatch
):
    """While the lake is slow (the data file's rename hangs 3 s), the extraction's session
    idles holding the day's lock; a server or role `idle_session_timeout` would end it, and
    the run could not commit. The session turns it off for itself."""
    monkeypatch.setenv("PG_ASSETS_CONNINFO", impatient_role)
    p = project([TABLE], bronze=adls_bronze(adls))
    adls.faults.append(Fault("rename", nth=1, mode="hang", delay=3, times=1))
    result = p.materialize(DAY.isoformat())
    adls.faults.clear()
    assert result.success
    data, manifest = p.read_day(NAME, DAY)
    assert manifest["rows"] == 2_000


def test_connections_bound_a_silent_network(pg_conninfo):
    """TCP keepalives and a user timeout are set unless the conninfo sets its own."""
    with psycopg.connect(pg_conninfo, **connect_kwargs(5, 0, pg_conninfo)) as conn:
        params = {p.keyword.decode(): (p.val or b"").decode() for p in conn.pgconn.info}
    for key, value in NETWORK_DEFAULTS.items():
        assert params[key] == value
    mine = make_conninfo(pg_conninfo, keepalives_idle="7")
    with psycopg.connect(mine, **connect_kwargs(5, 0, mine)) as conn:
        params = {p.keyword.decode(): (p.val or b"").decode() for p in conn.pgconn.info}
    assert params["keepalives_idle"] == "7"

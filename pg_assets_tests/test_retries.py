"""Retries only where a retry can help, and failures that keep their cause: a statement
timeout and a wrong password fail at once, naming table, partition and the server's own
message; a lost connection is retried (see test_failures.py)."""

import datetime as dt
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pg_assets.dev.demo_data import create_daily_partitioned

DAY = dt.date(2026, 10, 9)
TABLE = {"table": "retry.orders", "partition_column": "order_date", "start": "2026-10-01"}
SECRET = "wrong-secret-4711"


@pytest.fixture(scope="module")
def orders(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, "retry", "orders", [DAY], 100_000)


def events(result) -> list[str]:
    return [e.event_type_value for e in result.all_events]


def failure_message(result) -> str:
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failure.step_failure_data.error.message


def test_statement_timeout_is_not_retried(orders, project):
    p = project([TABLE], postgres={"retries": 2, "statement_timeout_s": 0.001})
    result = p.materialize(DAY.isoformat())
    assert not result.success
    assert "STEP_UP_FOR_RETRY" not in events(result)
    message = failure_message(result)
    assert "table retry.orders, partition 2026-10-09" in message
    assert "statement timeout" in message and "not retried" in message


@pytest.fixture
def password_role(pg_conninfo: str, db) -> str:
    """A role that must give a password over TCP (the embedded server trusts everyone else)."""
    (hba,) = db.execute("SHOW hba_file").fetchone()
    path = Path(hba)
    try:
        original = path.read_text()
        path.write_text(f"host all assets_pw 127.0.0.1/32 scram-sha-256\n{original}")
    except OSError:
        pytest.skip("cannot edit this server's pg_hba.conf")
    db.execute("DROP ROLE IF EXISTS assets_pw")
    db.execute("CREATE ROLE assets_pw LOGIN PASSWORD 'right-secret-0815'")
    db.execute("SELECT pg_reload_conf()")
    yield make_conninfo(pg_conninfo, user="assets_pw", password=SECRET)
    path.write_text(original)
    db.execute("SELECT pg_reload_conf()")
    db.execute("DROP ROLE assets_pw")


def test_wrong_password_fails_at_once_with_the_servers_words(
    orders, project, password_role, monkeypatch
):
    monkeypatch.setenv("PG_ASSETS_CONNINFO", password_role)
    p = project([TABLE], postgres={"retries": 2, "connect_timeout_s": 2})
    result = p.materialize(DAY.isoformat())
    assert not result.success
    assert "STEP_UP_FOR_RETRY" not in events(result)
    message = failure_message(result)
    assert "table retry.orders, partition 2026-10-09" in message
    assert 'password authentication failed for user "assets_pw"' in message
    assert "authentication" in message and "not retried" in message
    assert SECRET not in str([e.event_specific_data for e in result.all_events])

"""A backend killed mid-COPY: the run fails naming table and partition, the previous
version stays published, nothing is left in staging, and a retry succeeds."""

import datetime as dt
import gzip
import socket
import threading
import time

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.identifiers import QualifiedName
from pg_assets.dev.demo_data import create_daily_partitioned
from pg_assets.sinks.local import LocalSink
from pg_assets_tests.conftest import day_query, postgres_copy, same_rows

DAY = dt.date(2026, 10, 1)
ROWS = 600_000  # ~150 MB of CSV: the COPY runs long enough to be killed in the middle


@pytest.fixture(scope="module")
def big(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, "fail", "big", [DAY], ROWS)


def kill_copy_when_running(conninfo: str, killed: list[int], timeout: float = 60) -> None:
    """Terminate the first pg_assets backend seen running a COPY."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(conninfo, autocommit=True) as c:
        while time.monotonic() < deadline:
            row = c.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pg_assets%' "
                "AND state = 'active' AND query LIKE 'COPY %'"
            ).fetchone()
            if row:
                time.sleep(0.2)  # well inside the stream
                c.execute("SELECT pg_terminate_backend(%s)", row)
                killed.append(row[0])
                return
            time.sleep(0.01)


def materialize_while_killing(p, pg_conninfo: str):
    killed: list[int] = []
    killer = threading.Thread(target=kill_copy_when_running, args=(pg_conninfo, killed))
    killer.start()
    result = p.materialize(DAY.isoformat())
    killer.join()
    assert killed, "the COPY finished before it could be killed"
    return result


def test_killed_copy_keeps_previous_version_then_retry_succeeds(big, project, db, pg_conninfo):
    table = {"table": "fail.big", "partition_column": "order_date", "start": "2026-10-01"}
    p = project([table])
    sink = LocalSink(p.config.bronze.root)
    name = QualifiedName("fail", "big")

    # version 1 published
    assert p.materialize(DAY.isoformat()).success
    v1, v1_manifest = p.read_day(name, DAY)

    # the source changes; the next extraction is killed mid-stream
    db.execute("UPDATE fail.big SET note = 'changed' WHERE id = 1")
    result = materialize_while_killing(p, pg_conninfo)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "fail.big" in message and "2026-10-01" in message
    assert p.read_day(name, DAY) == (v1, v1_manifest)
    assert sink.list_files("_staging") == []

    # a retry publishes the new version
    result = p.materialize(DAY.isoformat())
    assert result.success
    expected = postgres_copy(db, day_query(sql.Identifier("fail", "big"), "order_date", DAY))
    v2, v2_manifest = p.read_day(name, DAY)
    assert same_rows(gzip.decompress(v2), expected)
    assert v2_manifest["rows"] == ROWS


def test_lost_connection_is_retried_within_the_run(big, project, pg_conninfo):
    p = project(
        [{"table": "fail.big", "partition_column": "order_date", "start": "2026-10-01"}],
        postgres={"retries": 2},
    )
    result = materialize_while_killing(p, pg_conninfo)
    assert result.success
    types = [e.event_type_value for e in result.all_events]
    assert "STEP_UP_FOR_RETRY" in types
    assert p.metadata(result)["rows"] == ROWS
    assert LocalSink(p.config.bronze.root).list_files("_staging") == []


def test_missing_conninfo_env_is_named(big, project):
    p = project(
        [{"table": "fail.big", "partition_column": "order_date", "start": "2026-10-01"}],
        postgres={"conninfo_env": "PG_ASSETS_UNSET_DSN"},
    )
    result = p.materialize(DAY.isoformat())
    assert not result.success
    text = str([e.event_specific_data for e in result.all_events])
    assert "PG_ASSETS_UNSET_DSN" in text and "is not set" in text


def test_the_connection_password_never_leaks(big, project, monkeypatch):
    """The conninfo the config names holds a password; the database is unreachable: the
    failure, the logs and the metadata say why, never the password."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(
        "PG_ASSETS_SECRET_DSN",
        f"host=127.0.0.1 port={port} dbname=shop user=reader password=hunter2-secret",
    )
    p = project(
        [{"table": "fail.big", "partition_column": "order_date", "start": "2026-10-01"}],
        postgres={"conninfo_env": "PG_ASSETS_SECRET_DSN", "connect_timeout_s": 1},
    )
    result = p.materialize(DAY.isoformat())
    assert not result.success
    text = "\n".join(f"{e.message} {e.event_specific_data}" for e in result.all_events)
    assert "table fail.big, partition 2026-10-01" in text and "Connection refused" in text
    assert "hunter2-secret" not in text

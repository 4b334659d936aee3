"""DETACH, DROP and TRUNCATE of the planned partition racing an extraction: the file is the
day's rows as of the extraction's snapshot, or the extraction fails with a clear error; never
a silently wrong file. Sequenced with a second session and pg_stat_activity, not sleeps.

The extraction here is the core's own sequence, without Dagster: describe once (as a ranged
run does), then per day a REPEATABLE READ transaction that calls `lock_plan` first and
streams the COPY of the plan it returns."""

import datetime as dt
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.compression import get_codec
from pg_assets.core.copy_stream import stream_copy
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.planner import (
    ConcurrentChangeError,
    CopyPlan,
    LockTimeoutError,
    TableInfo,
    describe_table,
    lock_plan,
    plan_day,
)
from pg_assets.core.session import connect_kwargs
from pg_assets.dev.demo_data import create_daily_partitioned, insert_orders
from pg_assets_tests.conftest import day_query, postgres_copy

NAME = QualifiedName("race", "t")
DAYS = [dt.date(2026, 10, 20) + dt.timedelta(days=n) for n in range(3)]
DAY = DAYS[1]
CHILD = QualifiedName("race", f"t_{DAY:%Y_%m_%d}")


class Collect:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, block: bytes, /) -> None:
        self.parts.append(bytes(block))


class CountingCursor(psycopg.Cursor):
    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> "CountingCursor":
        self.connection.statements += 1  # type: ignore[attr-defined]
        return super().execute(query, params, **kwargs)


class Extraction:
    """One day's transaction, in two steps so a test can act between them."""

    def __init__(self, conninfo: str, info: TableInfo, day: dt.date = DAY) -> None:
        self.conn = psycopg.connect(
            conninfo, cursor_factory=CountingCursor, **connect_kwargs(10, 0)
        )
        self.conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.conn.statements = 0  # type: ignore[attr-defined]
        self.pid = self.conn.info.backend_pid
        self.info, self.day = info, day
        self.plan: CopyPlan | None = None

    def lock(self, lock_timeout_s: float = 30) -> CopyPlan:
        # no statement before lock_plan: the first one opens the transaction
        self.plan = lock_plan(
            self.conn, self.info, plan_day(self.info, self.day, "UTC"), lock_timeout_s
        )
        return self.plan

    def copy(self) -> bytes:
        assert self.plan is not None
        out = Collect()
        with self.conn.cursor() as cur:
            stream_copy(cur, self.plan.statement, out, get_codec("none").compressor())
        self.conn.commit()
        return b"".join(out.parts)

    def close(self) -> None:
        self.conn.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def race(pg_conninfo: str):
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS race CASCADE")
        create_daily_partitioned(c, "race", "t", DAYS, 400)
    pool = ThreadPoolExecutor(max_workers=2)
    with psycopg.connect(pg_conninfo, autocommit=True) as observer:
        yield observer
    pool.shutdown(wait=False, cancel_futures=True)


def described(conninfo: str) -> TableInfo:
    with psycopg.connect(conninfo, **connect_kwargs(5, 0), autocommit=True) as conn:
        return describe_table(conn, NAME, "order_date")


def reference(observer: psycopg.Connection, day: dt.date = DAY) -> bytes:
    """The day as PostgreSQL's own COPY of the parent returns it now."""
    with psycopg.connect(observer.info.dsn, **connect_kwargs(5, 0)) as conn:
        return postgres_copy(conn, day_query(NAME.identifier, "order_date", day))


def rows(data: bytes) -> int:
    import csv
    import io

    return len(list(csv.reader(io.StringIO(data.decode(), newline="")))) - 1


def waiting_on_lock(observer: psycopg.Connection, pid: int) -> bool:
    row = observer.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    return bool(row) and row[0] == "Lock"


def in_background(fn: Callable[[], Any]) -> Future:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def ddl_session(conninfo: str) -> psycopg.Connection:
    return psycopg.connect(conninfo, autocommit=True)


DETACH = sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(NAME.identifier, CHILD.identifier)
DROP = sql.SQL("DROP TABLE {}").format(CHILD.identifier)
TRUNCATE = sql.SQL("TRUNCATE {}").format(CHILD.identifier)
HEADER_ONLY = b"id,order_date,created_at,customer_id,amount,status,attrs,tags,note\n"


# --- the DDL committed after the plan was made, before the day's transaction -------------


@pytest.mark.parametrize("ddl", [DETACH, DROP], ids=["detach", "drop"])
def test_child_gone_since_describe_is_replanned(race, pg_conninfo, ddl):
    info = described(pg_conninfo)  # a ranged run describes once
    assert plan_day(info, DAY, "UTC").strategy == "exact_child"
    race.execute(ddl)
    x = Extraction(pg_conninfo, info)
    try:
        plan = x.lock()
        assert (plan.strategy, plan.relation) == ("parent_filter", NAME)
        assert CHILD not in [c.name for c in plan.info.children]
        assert x.copy() == reference(race) == HEADER_ONLY  # the day has no rows any more
    finally:
        x.close()


def test_unchanged_catalog_costs_three_statements_a_day(race, pg_conninfo):
    info = described(pg_conninfo)
    for day in DAYS:
        x = Extraction(pg_conninfo, info, day)
        try:
            plan = x.lock()
            assert plan.info is info and plan.strategy == "exact_child"
            assert x.conn.statements == 3  # type: ignore[attr-defined]
            assert x.copy() == reference(race, day)
        finally:
            x.close()


# --- the extraction holds its locks: DDL waits for it ------------------------------------


@pytest.mark.parametrize("ddl", [DETACH, DROP, TRUNCATE], ids=["detach", "drop", "truncate"])
def test_ddl_waits_for_the_extraction(race, pg_conninfo, ddl):
    before = reference(race)
    assert rows(before) == 400
    info = described(pg_conninfo)
    x = Extraction(pg_conninfo, info)
    ddl_conn = ddl_session(pg_conninfo)
    try:
        assert x.lock().strategy == "exact_child"  # snapshot taken, locks held
        done = in_background(lambda: ddl_conn.execute(ddl))
        # Without our locks TRUNCATE would commit at once and the COPY below would read an
        # empty table (TRUNCATE is not MVCC-safe): a silently wrong file.
        wait_for(
            lambda: done.done() or waiting_on_lock(race, ddl_conn.info.backend_pid),
            "the DDL to block or finish",
        )
        assert not done.done(), "the DDL did not wait for the extraction's locks"
        assert x.copy() == before
        done.result(timeout=30)  # our commit released it
    finally:
        x.close()
        ddl_conn.close()
    assert reference(race) == HEADER_ONLY


# --- the DDL holds its lock first: the extraction waits, then sees what it committed -----


@pytest.mark.parametrize("ddl", [DETACH, DROP, TRUNCATE], ids=["detach", "drop", "truncate"])
def test_extraction_waits_for_the_ddl_then_sees_it(race, pg_conninfo, ddl):
    info = described(pg_conninfo)
    ddl_conn = psycopg.connect(pg_conninfo)
    x = Extraction(pg_conninfo, info)
    try:
        ddl_conn.execute(ddl)  # uncommitted: holds ACCESS EXCLUSIVE
        locking = in_background(x.lock)
        wait_for(lambda: waiting_on_lock(race, x.pid), "the extraction to wait for the DDL")
        ddl_conn.commit()
        plan = locking.result(timeout=30)
        data = x.copy()
    finally:
        x.close()
        ddl_conn.close()
    assert data == reference(race) == HEADER_ONLY
    if ddl != TRUNCATE:
        assert plan.strategy == "parent_filter"


def test_lock_timeout_names_the_relation_and_the_setting(race, pg_conninfo):
    info = described(pg_conninfo)
    ddl_conn = psycopg.connect(pg_conninfo)
    x = Extraction(pg_conninfo, info)
    try:
        ddl_conn.execute(TRUNCATE)  # holds ACCESS EXCLUSIVE on the child only
        with pytest.raises(LockTimeoutError) as err:
            x.lock(lock_timeout_s=0.2)
        message = str(err.value)
        assert f"could not lock {CHILD}" in message
        assert "lock_timeout_s=0.2" in message and "table race.t, day 2026-10-21" in message
        assert f"pid {ddl_conn.info.backend_pid}" in message
        assert err.value.relation == CHILD
    finally:
        x.close()
        ddl_conn.rollback()
        ddl_conn.close()


def test_ddl_on_another_partition_does_not_block_the_day(race, pg_conninfo):
    info = described(pg_conninfo)
    other = QualifiedName("race", f"t_{DAYS[0]:%Y_%m_%d}")
    ddl_conn = psycopg.connect(pg_conninfo)
    x = Extraction(pg_conninfo, info)
    try:
        ddl_conn.execute(sql.SQL("TRUNCATE {}").format(other.identifier))  # held, uncommitted
        assert x.lock(lock_timeout_s=1).relation == CHILD
        assert x.copy() == reference(race)
    finally:
        x.close()
        ddl_conn.rollback()
        ddl_conn.close()


def test_truncate_of_a_replanned_child_after_the_snapshot_is_refused(race, pg_conninfo):
    """The double race: the child changed since describe (re-plan onto a new child), and that
    new child is truncated after the snapshot but before we could lock it."""
    info = described(pg_conninfo)  # plans the day on CHILD
    new_child = QualifiedName("race", "t_new")
    race.execute(DETACH)
    race.execute(sql.SQL("CREATE TABLE {} (LIKE {})").format(new_child.identifier, NAME.identifier))
    insert_orders(race, new_child.identifier, DAY, 50, 0)
    race.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            NAME.identifier,
            new_child.identifier,
            sql.Literal(DAY),
            sql.Literal(DAY + dt.timedelta(days=1)),
        )
    )
    ddl_conn = psycopg.connect(pg_conninfo)
    x = Extraction(pg_conninfo, info)
    try:
        ddl_conn.execute(sql.SQL("TRUNCATE {}").format(new_child.identifier))
        locking = in_background(x.lock)
        wait_for(lambda: waiting_on_lock(race, x.pid), "the extraction to wait for TRUNCATE")
        ddl_conn.commit()  # commits after the extraction's snapshot
        with pytest.raises(ConcurrentChangeError, match=r"race\.t_new was truncated"):
            locking.result(timeout=30)
    finally:
        x.close()
        ddl_conn.close()


def test_child_attached_since_describe_on_a_parent_filter_day(race, pg_conninfo):
    """A day that had no partition (parent_filter, locks: parent and DEFAULT) gets one after
    the describe; it must be locked before it is read, and a TRUNCATE of it committed after
    the snapshot must not pass for an empty day."""
    day = DAYS[-1] + dt.timedelta(days=1)
    info = described(pg_conninfo)
    assert plan_day(info, day, "UTC").strategy == "parent_filter"
    new_child = QualifiedName("race", "t_late")
    race.execute(sql.SQL("CREATE TABLE {} (LIKE {})").format(new_child.identifier, NAME.identifier))
    insert_orders(race, new_child.identifier, day, 30, 0)
    race.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            NAME.identifier,
            new_child.identifier,
            sql.Literal(day),
            sql.Literal(day + dt.timedelta(days=1)),
        )
    )
    ddl_conn = psycopg.connect(pg_conninfo)
    x = Extraction(pg_conninfo, info, day)
    try:
        ddl_conn.execute(sql.SQL("TRUNCATE {}").format(new_child.identifier))
        locking = in_background(x.lock)
        wait_for(lambda: waiting_on_lock(race, x.pid), "the extraction to lock the new child")
        ddl_conn.commit()
        with pytest.raises(ConcurrentChangeError, match=r"race\.t_late was truncated"):
            locking.result(timeout=30)
    finally:
        x.close()
        ddl_conn.close()


def test_replanned_child_is_read_when_nothing_else_happens(race, pg_conninfo):
    info = described(pg_conninfo)
    new_child = QualifiedName("race", "t_new")
    race.execute(DETACH)
    race.execute(sql.SQL("CREATE TABLE {} (LIKE {})").format(new_child.identifier, NAME.identifier))
    insert_orders(race, new_child.identifier, DAY, 50, 0)
    race.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            NAME.identifier,
            new_child.identifier,
            sql.Literal(DAY),
            sql.Literal(DAY + dt.timedelta(days=1)),
        )
    )
    x = Extraction(pg_conninfo, info)
    try:
        plan = x.lock()
        assert (plan.strategy, plan.relation) == ("exact_child", new_child)
        data = x.copy()
    finally:
        x.close()
    assert data == reference(race) and rows(data) == 50


def test_partition_left_pending_by_an_interrupted_detach_concurrently(race, pg_conninfo):
    """DETACH … CONCURRENTLY that was cancelled leaves the partition 'detach pending':
    PostgreSQL's own queries on the parent no longer read it, so neither may we."""
    race.execute("DROP TABLE race.t_default")  # DETACH CONCURRENTLY refuses a DEFAULT
    info = described(pg_conninfo)
    holder = psycopg.connect(pg_conninfo)  # an old transaction the detach must wait for
    holder.execute(sql.SQL("LOCK TABLE ONLY {} IN ACCESS SHARE MODE").format(NAME.identifier))
    ddl_conn = ddl_session(pg_conninfo)
    pid = ddl_conn.info.backend_pid
    detaching = in_background(
        lambda: ddl_conn.execute(
            sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(
                NAME.identifier, CHILD.identifier
            )
        )
    )
    try:
        wait_for(
            lambda: detaching.done() or waiting_on_lock(race, pid), "DETACH CONCURRENTLY to wait"
        )
        race.execute("SELECT pg_cancel_backend(%s)", (pid,))
        with pytest.raises(psycopg.errors.QueryCanceled):
            detaching.result(timeout=30)
    finally:
        holder.rollback()
        holder.close()
        ddl_conn.close()
    (pending,) = race.execute(
        "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = %s::regclass",
        (CHILD.display,),
    ).fetchone()
    assert pending
    x = Extraction(pg_conninfo, info)
    try:
        plan = x.lock()
        data = x.copy()
    finally:
        x.close()
    assert plan.strategy == "parent_filter"
    assert data == reference(race) == HEADER_ONLY
    race.execute(
        sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(
            NAME.identifier, CHILD.identifier
        )
    )

"""The incremental sensor evaluated as the daemon would (the repository's resources, a
persistent instance, the cursor it returned last time), with the runs it requests launched
like the daemon launches them: no run when nothing changed, one when something did, none while
a run of the table is queued or running, a failed run retried after a backoff."""

import re
import threading
import time
import uuid

import psycopg
from dagster import DagsterRun, DagsterRunStatus, RunsFilter, instance_for_test

from pg_assets.sensors.incremental import BATCH_HINT_TAG, TABLE_TAG
from pg_assets_tests import test_incremental as base
from pg_assets_tests.test_incremental import (
    SETTLE_S,
    Inc,
    create_table,
    failure_message,
    insert,
    latest_by_key,
    materialized,
    table_rows,
)

inc, pinst = base.inc, base.pinst  # fixtures

LOCK_KEY = "pg_assets:test/inc.polled:incremental"


def wait_for_status(p: Inc, status: DagsterRunStatus, timeout: float = 60) -> DagsterRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = p.instance.get_runs(RunsFilter(statuses=[status]), limit=1)
        if runs:
            return runs[0]
        time.sleep(0.05)
    raise AssertionError(f"no run reached {status} within {timeout} s")


def test_sensor_requests_a_run_only_when_needed_and_never_two(db, inc, pg_conninfo):
    create_table(db, "polled")
    insert(db, "polled", 1, 20)
    p = inc([{"table": "inc.polled", "cursor": "updated_at", "poll_interval_s": 1}])
    time.sleep(SETTLE_S)  # so batch 0 can take every row (rows newer than the cap wait)
    assert p.sensor().minimum_interval_seconds == 1
    assert p.sensor().default_status.value == "STOPPED"

    # an empty lake: batch 0, with a run key that does not change until the state does
    first = p.tick(None)
    (request,) = first.run_requests
    assert request.run_key == "inc.polled:batch=0:attempt=0"
    assert request.tags[TABLE_TAG] == "test/inc.polled" and BATCH_HINT_TAG not in request.tags
    assert [r.run_key for r in p.tick(first.cursor).run_requests] == [request.run_key]
    materialized(p.launch(request))

    # nothing changed: no run, and the cursor records what was seen
    idle = p.tick(first.cursor)
    assert idle.run_requests == [] and "no row above the watermark" in idle.skip_message
    (manifest, _) = p.batches()[0]
    assert f"after={manifest['watermark']['high']}" in idle.cursor

    # something changed: exactly one run, continuing from the lake's watermark
    insert(db, "polled", 100, 5)
    time.sleep(SETTLE_S)
    busy = p.tick(idle.cursor)
    (request,) = busy.run_requests
    assert request.run_key.startswith(f"inc.polled:batch=1:after={manifest['watermark']['high']}")
    assert request.tags[BATCH_HINT_TAG] == "0"

    # a run of the table in flight (this one launched by hand, so only its planned
    # materialization says so) blocks further requests until it ends
    outcome: list[object] = []
    with psycopg.connect(pg_conninfo, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (LOCK_KEY,))
        runner = threading.Thread(target=lambda: outcome.append(p.materialize()))
        runner.start()
        started = wait_for_status(p, DagsterRunStatus.STARTED)
        held = p.tick(busy.cursor)
        assert held.run_requests == []
        assert f"run {started.run_id} of inc.polled is started" in held.skip_message
        assert held.cursor == busy.cursor
        holder.execute("SELECT pg_advisory_unlock_all()")
        runner.join(120)
    assert materialized(outcome[0])["batch"] == 1  # type: ignore[index]

    # a run the sensor requested that has not started yet blocks too
    queued = DagsterRun(
        job_name="__ASSET_JOB",
        run_id=str(uuid.uuid4()),
        status=DagsterRunStatus.NOT_STARTED,
        tags={TABLE_TAG: "test/inc.polled"},
    )
    p.instance.add_run(queued)
    insert(db, "polled", 200, 5)
    time.sleep(SETTLE_S)
    waiting = p.tick(held.cursor)
    assert waiting.run_requests == []
    assert f"run {queued.run_id} of inc.polled is not started" in waiting.skip_message
    p.instance.report_run_canceled(queued)

    # the lake moved without the sensor (the run above): it notices from the lake, not from
    # its cursor, and asks for batch 2
    (request,) = p.tick(held.cursor).run_requests
    assert ":batch=2:" in request.run_key and request.tags[BATCH_HINT_TAG] == "1"
    materialized(p.launch(request))
    done = p.tick(None)  # a wiped instance or a lost cursor: the lake says the same
    assert done.run_requests == [] and "(batch 2)" in done.skip_message
    assert latest_by_key(p.batches()) == table_rows("polled")


def test_a_failed_run_is_retried_after_a_backoff(db, inc, pg_conninfo):
    create_table(db, "polled")
    insert(db, "polled", 1, 3)
    p = inc(
        [{"table": "inc.polled", "cursor": "updated_at", "poll_interval_s": 2}],
        postgres={"lock_timeout_s": 0.5},
    )
    data = p.tick(None)
    with psycopg.connect(pg_conninfo, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (LOCK_KEY,))
        (request,) = data.run_requests
        assert "is extracting a batch of this table" in failure_message(p.launch(request))
    waiting = p.tick(data.cursor)
    assert waiting.run_requests == []
    assert re.search(
        r"ended without a new batch; trying again in [12] s \(retry 1\)", waiting.skip_message
    )
    time.sleep(2.1)
    (retry,) = p.tick(waiting.cursor).run_requests
    assert retry.run_key == "inc.polled:batch=0:attempt=1"
    materialized(p.launch(retry))
    assert [m["rows"] for m, _ in p.batches()] == [3]


def test_sensor_says_why_nothing_can_be_taken(db, inc, pg_conninfo):
    """Rows above the watermark behind an open transaction: no run, and the reason names it."""
    create_table(db, "polled")
    insert(db, "polled", 1, 3)
    p = inc([{"table": "inc.polled", "cursor": "updated_at"}])
    time.sleep(SETTLE_S)
    (request,) = p.tick(None).run_requests
    materialized(p.launch(request))
    with psycopg.connect(pg_conninfo, application_name="nightly_report") as report:
        report.execute("SELECT 1")
        time.sleep(SETTLE_S)
        insert(db, "polled", 10, 3)
        data = p.tick(None)
        report.rollback()
    assert data.run_requests == []
    assert "none can be taken yet" in data.skip_message
    assert "nightly_report, idle in transaction" in data.skip_message
    time.sleep(SETTLE_S)
    with instance_for_test() as fresh:  # the lake alone decides; no Dagster state needed
        q = Inc(p.config, fresh)
        assert len(q.tick(None).run_requests) == 1

"""What a crash or a race leaves behind, and how it is found and cleaned up.

- A run killed (SIGKILL) while publishing a day leaves a second data file in the day folder;
  the `bronze_readable` check names it (WARN) until a re-materialization of the day removes it,
  and does not mistake the file of a run still publishing for a leftover.
- Staging files of killed runs are swept by the next daily run, once per run.
- The typed reader reads a day republished while it reads the table.
"""

import datetime as dt
import fcntl
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pytest
from dagster import (
    AssetCheckKey,
    AssetCheckSeverity,
    AssetSelection,
    DagsterRun,
    DagsterRunStatus,
    build_sensor_context,
    materialize,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from pg_assets import read
from pg_assets.build import build_resources
from pg_assets.core.extract import lock_key
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths
from pg_assets.dev.demo_data import create_daily_partitioned, insert_orders
from pg_assets.sinks.local import LOCKS_DIR
from pg_assets_tests.adls_server import Fault
from pg_assets_tests.conftest import adls_bronze, day_query, postgres_copy
from pg_assets_tests.test_publish import MATERIALIZE

DAYS = [dt.date(2026, 10, 5), dt.date(2026, 10, 6), dt.date(2026, 10, 7)]
DAY = DAYS[-1]
NAME = QualifiedName("lo", "orders")
TABLE = {"table": "lo.orders", "partition_column": "order_date", "start": "2026-10-01"}


@pytest.fixture(scope="module")
def orders(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, NAME.schema, NAME.name, DAYS, 2_000)


def data_files(sink, day: dt.date = DAY) -> list[str]:
    paths = daily_paths("test", NAME, day)
    return [f for f in sink.list_files(paths.folder) if paths.is_data_file(f)]


def bronze_readable(p, day: dt.date = DAY):
    """A check-only run of `day` (nothing re-extracted): its bronze_readable evaluation."""
    asset = p.asset()
    (checks,) = [c for c in p.defs.asset_checks if AssetCheckKey(asset.key, "bronze_readable")
                 in c.check_keys]  # fmt: skip
    result = materialize(
        [asset, checks],
        selection=AssetSelection.checks_for_assets(asset),
        resources=build_resources(p.config),
        instance=p.instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: day.isoformat(),
              ASSET_PARTITION_RANGE_END_TAG: day.isoformat()},
    )  # fmt: skip
    (ev,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "bronze_readable"]
    return ev


def start_run(p) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", MATERIALIZE, str(p.config.path), DAY.isoformat()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_for(what: str, condition, run: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def assert_flagged_until_rematerialized(p, db, leftover: str) -> None:
    sink = p.sink()
    ev = bronze_readable(p)
    assert not ev.passed and ev.severity == AssetCheckSeverity.WARN
    assert sink.uri(leftover) in ev.description and "Re-materialize the day" in ev.description
    assert ev.metadata["other_files"].value == [sink.uri(leftover)]
    assert p.materialize(DAY.isoformat()).success
    data, _ = p.read_day(NAME, DAY)  # one data file, the manifest's: the leftover is gone
    expected = postgres_copy(db, day_query(NAME.identifier, "order_date", DAY))
    assert gzip.decompress(data) == expected
    ev = bronze_readable(p)
    assert ev.passed and "other_files" not in ev.metadata


def test_a_run_killed_before_its_commit_leaves_a_file_the_check_names(orders, project, db):
    """SIGKILL a materialization after its data file is published and before its manifest is
    replaced (held at the commit: the test holds the manifest's commit lock): the new file is
    left beside the committed one, the check names it, a re-materialization removes it."""
    p = project([TABLE], postgres={"retries": 0})
    assert p.materialize(DAY.isoformat()).success
    sink = p.sink()
    (committed,) = data_files(sink)
    manifest = daily_paths("test", NAME, DAY).manifest
    stripe = hashlib.sha1(manifest.encode()).hexdigest()[:2]  # LocalSink._target_lock's file
    (sink.root / LOCKS_DIR).mkdir(exist_ok=True)
    fd = os.open(sink.root / LOCKS_DIR / stripe, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run = start_run(p)
        try:
            wait_for("its data file", lambda: len(data_files(sink)) == 2, run)
            os.kill(run.pid, signal.SIGKILL)
            run.wait(timeout=30)
        finally:
            if run.poll() is None:
                run.kill()
    finally:
        os.close(fd)
    (leftover,) = [f for f in data_files(sink) if f != committed]
    assert json.loads(sink.read_bytes(manifest))["file"] == committed.rsplit("/", 1)[1]
    assert_flagged_until_rematerialized(p, db, leftover)


def test_a_run_killed_after_its_commit_leaves_the_old_file_the_check_names(
    orders, adls, project, db
):
    """SIGKILL a materialization on ADLS after its commit, while it removes the superseded
    version (the service stops answering that delete): the old file stays beside the new."""
    p = project([TABLE], bronze=adls_bronze(adls), postgres={"retries": 0})
    assert p.materialize(DAY.isoformat()).success
    sink = p.sink()
    (old,) = data_files(sink)
    hang = Fault("delete", path=f"date={DAY}/", mode="hang", delay=30)
    adls.faults.append(hang)
    run = start_run(p)
    try:
        wait_for("the delete of the old version", lambda: hang.hits > 0, run)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
        adls.faults.clear()
    assert old in data_files(sink) and len(data_files(sink)) == 2
    manifest = json.loads(sink.read_bytes(daily_paths("test", NAME, DAY).manifest))
    assert manifest["file"] != old.rsplit("/", 1)[1]  # committed: the new version stands
    assert_flagged_until_rematerialized(p, db, old)


def test_the_file_of_a_run_still_publishing_is_not_a_leftover(orders, project, pg_conninfo):
    """While a run holds the day's lock, a second data file is its own (published, not yet
    committed): the check says so and passes; once the lock is free it is a leftover."""
    p = project([TABLE])
    assert p.materialize(DAY.isoformat()).success
    sink = p.sink()
    (committed,) = data_files(sink)
    paths = daily_paths("test", NAME, DAY)
    other = paths.data("20991231T000000000000Z-0badf00d", ".gz")
    sink.write_bytes("test", other, sink.read_bytes(committed), "application/gzip")
    key = lock_key("test", NAME, DAY)
    with psycopg.connect(pg_conninfo, autocommit=True) as run:
        run.execute("SELECT set_config('application_name', 'pg_assets run 0badf00d', false)")
        run.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
        ev = bronze_readable(p)
        assert ev.passed, ev.description
        assert "pg_assets run 0badf00d" in ev.description and "publishing" in ev.description
    ev = bronze_readable(p)
    assert not ev.passed and sink.uri(other) in ev.description


TODAY = dt.datetime.now(dt.UTC).date()
RECENT = [TODAY - dt.timedelta(days=2), TODAY - dt.timedelta(days=1)]  # in the sensor's window
RECENT_NAME = QualifiedName("lo", "recent")


def tick(p, cursor: str | None):
    """One late-data sensor evaluation as the daemon performs it."""
    repo = p.defs.get_repository_def()
    (sensor,) = [s for s in p.defs.sensors if s.name.endswith("__late_data")]
    with build_sensor_context(
        instance=p.instance, cursor=cursor, repository_def=repo, sensor_name=sensor.name,
        resources=dict(repo.get_top_level_resources()),
    ) as context:  # fmt: skip
        return sensor.evaluate_tick(context)


@pytest.mark.parametrize("late_data", ["rematerialize", "warn"])
def test_the_late_data_sensor_finds_leftovers_and_offers_the_cleanup(
    project, pg_conninfo, db, late_data
):
    """A superseded version left in a recent day's folder: the sensor reports it once as a
    failed bronze_readable (WARN) naming it, not while a run of the day holds its lock, and
    (rematerialize) requests a run of the day, which removes it."""
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS lo.recent CASCADE")
        create_daily_partitioned(c, "lo", "recent", RECENT, 300)
    table = {"table": "lo.recent", "partition_column": "order_date",
             "start": RECENT[0].isoformat()}  # fmt: skip
    p = project([table], checks={"late_data": late_data, "freshness_deadline": None})
    for day in RECENT:
        assert p.materialize(day.isoformat()).success
    quiet = tick(p, None)
    assert quiet.run_requests == [] and quiet.asset_events == []
    sink = p.sink()
    day = RECENT[1]
    paths = daily_paths("test", RECENT_NAME, day)
    (committed,) = [f for f in sink.list_files(paths.folder) if paths.is_data_file(f)]
    old = paths.data("20260101T000000000000Z-0badf00d", ".gz")  # a version never removed
    sink.write_bytes("killed", old, sink.read_bytes(committed), "application/gzip")
    with psycopg.connect(pg_conninfo, autocommit=True) as run:  # a run of the day publishing
        run.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))",
                    (lock_key("test", RECENT_NAME, day),))  # fmt: skip
        busy = tick(p, quiet.cursor)
        assert busy.run_requests == [] and busy.asset_events == []
    data = tick(p, busy.cursor)
    (ev,) = data.asset_events
    assert ev.check_name == "bronze_readable" and ev.partition == day.isoformat()
    assert not ev.passed and ev.severity == AssetCheckSeverity.WARN
    assert sink.uri(old) in ev.description and ev.metadata["other_files"].value == [sink.uri(old)]
    again = tick(p, data.cursor)  # reported once, not at every tick
    assert again.run_requests == [] and again.asset_events == []
    if late_data == "warn":
        assert data.run_requests == [] and "late_data: warn" in ev.description
        return
    (request,) = data.run_requests
    assert request.partition_key == day.isoformat()
    assert f"re-materialization of {day} requested" in ev.description
    assert p.materialize(request.partition_key, tags=request.tags).success
    p.read_day(RECENT_NAME, day)  # one data file: the leftover is gone
    settled = tick(p, again.cursor)
    assert settled.run_requests == [] and settled.asset_events == []
    assert '"leftovers": {}' in settled.cursor
    # a file pg_assets never writes: reported, but no run is requested (none would remove it)
    marker = f"{paths.folder}/_SUCCESS"
    sink.write_bytes("someone else", marker, b"", "application/octet-stream")
    foreign = tick(p, settled.cursor)
    (ev,) = foreign.asset_events
    assert foreign.run_requests == [] and not ev.passed
    assert sink.uri(marker) in ev.description and "delete those by hand" in ev.description
    assert "no run requested" in ev.description and "killed" not in ev.description
    quiet = tick(p, foreign.cursor)  # reported once: not again while the folder is the same
    assert quiet.run_requests == [] and quiet.asset_events == []
    assert quiet.cursor == foreign.cursor


# -- staging files of killed runs ---------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "adls"])
def test_a_daily_run_sweeps_old_staging_files_once(orders, project, request, where):
    """A staging file a killed run left two days ago is removed by the next daily run (one
    listing of `_staging/` for a run of three days); one written a minute ago is kept, and so
    is an old one of a run the instance says is still going (on ADLS a long upload's time
    moves only when it is created and flushed)."""
    server = request.getfixturevalue("adls") if where == "adls" else None
    p = project([TABLE], bronze=adls_bronze(server) if server else {})
    sink = p.sink()
    long_run = p.instance.add_run(
        DagsterRun(
            job_name="incremental", run_id=str(uuid.uuid4()), status=DagsterRunStatus.STARTED
        )
    )
    old = sink.open_staging("killed-run", "x/old.csv.gz", "application/gzip")
    old.write(b"half a file")
    young = sink.open_staging("live-run", "x/young.csv.gz", "application/gzip")
    young.write(b"being written")
    uploading = sink.open_staging(long_run.run_id, "x/big.csv.gz", "application/gzip")
    uploading.write(b"a day-long upload")
    when = time.time() - 2 * 24 * 3600
    for staged in (old, uploading):
        if server is None:
            os.utime(sink.root / staged.relpath, (when, when))
        else:
            server.set_modified("bronze", f"lake/{staged.relpath}", when)
    if server is not None:
        server.requests.clear()
    result = p.materialize(
        None, tags={ASSET_PARTITION_RANGE_START_TAG: DAYS[0].isoformat(),
                    ASSET_PARTITION_RANGE_END_TAG: DAYS[-1].isoformat()},
    )  # fmt: skip
    assert result.success
    if server is not None:  # one listing of _staging for the whole run
        assert len([r for r in server.ops("list") if r[2] == "bronze/lake/_staging"]) == 1
    assert sorted(sink.list_files("_staging")) == sorted([young.relpath, uploading.relpath])
    logs = [e.user_message for e in p.instance.all_logs(result.run_id)]
    assert any("removed 1 staging file(s) older than 24 h" in m and old.relpath in m for m in logs)


# -- a reader racing a re-publish -----------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "adls"])
def test_a_reader_reads_the_new_version_of_a_day_republished_while_it_reads(
    orders, project, db, request, where
):
    """The reader has listed the committed days (their manifests) when a late row arrives and
    the day is re-materialized, deleting the file the reader's manifest names: it reads the
    day's manifest again and returns the new version's rows."""
    server = request.getfixturevalue("adls") if where == "adls" else None
    p = project([TABLE], bronze=adls_bronze(server) if server else {})
    for day in DAYS:
        assert p.materialize(day.isoformat()).success
    sink = p.sink()
    reader = read.read_batches(sink, "test", "lo.orders")  # the days' manifests are read
    insert_orders(db, NAME.identifier, DAY, 1, 9_000_000)
    try:
        assert p.materialize(DAY.isoformat()).success  # the old file of DAY is deleted
        table = reader.read_all()
        rows = {d: n for d, n in db.execute(
            "SELECT order_date, count(*) FROM lo.orders GROUP BY 1").fetchall()}  # fmt: skip
        got = table.group_by("date").aggregate([("id", "count")]).to_pylist()
        assert {r["date"]: r["id_count"] for r in got} == rows
        assert 9_000_001 in table.column("id").to_pylist()
        # the file the new manifest names is gone too (deleted by hand): a clear error
        reader = read.read_batches(sink, "test", "lo.orders", start=DAY, end=DAY)
        assert p.materialize(DAY.isoformat()).success
        (current,) = data_files(sink)
        sink.delete(current)
        with pytest.raises(read.ReadError, match=f"table lo.orders, day {DAY}: .* is gone too"):
            reader.read_all()
    finally:
        db.execute("DELETE FROM lo.orders WHERE id = 9000001")

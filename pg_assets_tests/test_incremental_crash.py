"""Batches across real faults. A run process killed (SIGKILL) after its batch's manifest
landed but before the run ended: the batch is committed, the next run continues from its
watermark, and no batch is duplicated or skipped (the materialization runs in its own process
with its own Dagster instance, and is killed the moment the manifest appears in Bronze). A run
whose PostgreSQL session (and with it the table's lock) dies while it commits cannot commit
over the run that took the lock. A commit that cannot be read back deletes nothing."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus

from pg_assets.assets.incremental import incremental_spec
from pg_assets.core.layout import incremental_paths
from pg_assets_tests import test_incremental as base
from pg_assets_tests.adls_server import Fault
from pg_assets_tests.conftest import adls_bronze
from pg_assets_tests.test_incremental import (
    SETTLE_S,
    create_table,
    failure_message,
    insert,
    latest_by_key,
    materialized,
    table_rows,
)

inc, pinst = base.inc, base.pinst  # fixtures

RUN = """
import json, sys
from dagster import DagsterInstance
from pg_assets.build import build_definitions
from pg_assets.config import load_config

defs = build_definitions(load_config(sys.argv[1]))
job = defs.resolve_implicit_global_asset_job_def()
with DagsterInstance.get() as instance:
    result = job.execute_in_process(instance=instance, raise_on_error=False)
print("RUN ENDED", result.success, flush=True)
failures = [e.step_failure_data.error.message for e in result.all_events
            if e.event_type_value == "STEP_FAILURE"]
print(json.dumps({"success": result.success, "failures": failures}), flush=True)
"""


def run_and_kill_after_manifest(
    config_path: Path, manifest: Path, home: Path
) -> tuple[int, DagsterRunStatus]:
    """Materialize in a child process; SIGKILL it as soon as `manifest` exists. Returns the
    child's exit code and the status its own instance recorded for the run."""
    home.mkdir(exist_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    child = subprocess.Popen(
        [sys.executable, "-c", RUN, str(config_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while not manifest.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the child ended (or hung) without writing {manifest}")
            time.sleep(0.0005)
        child.send_signal(signal.SIGKILL)
        code = child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert child.stdout is not None
    with child.stdout:
        assert b"RUN ENDED" not in child.stdout.read()
    with DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        status = run.status
    return code, status


def test_killed_after_the_manifest_the_next_run_continues(db, inc, tmp_path):
    create_table(db, "crash")
    insert(db, "crash", 1, 1000)
    p = inc([{"table": "inc.crash", "cursor": "updated_at"}])
    time.sleep(SETTLE_S)
    materialized(p.materialize())  # batch 0, in this process
    paths = incremental_paths("test", p.config.tables[0].name)
    root = Path(p.config.bronze.root)
    config_path = p.config.path
    assert config_path is not None
    killed_mid_run = 0
    for attempt in range(1, 4):
        insert(db, "crash", attempt * 10_000, 100)
        time.sleep(SETTLE_S)
        # an earlier attempt of this batch, killed before its commit, left version 0: this
        # attempt writes version 1 and would remove version 0 after its commit
        earlier = root / paths.data(attempt, 0, ".gz")
        earlier.parent.mkdir(parents=True, exist_ok=True)
        earlier.write_bytes(b"an earlier attempt's file")
        code, status = run_and_kill_after_manifest(
            config_path, root / paths.manifest(attempt), tmp_path / f"home{attempt}"
        )
        assert code == -signal.SIGKILL
        # the run never ended: its own instance still has it running
        killed_mid_run += status == DagsterRunStatus.STARTED
        assert status in (DagsterRunStatus.STARTED, DagsterRunStatus.SUCCESS)
        # the kill lands within ~100 µs of the commit, before or after that removal: put the
        # file back if it came after, so that what the next run finds does not depend on it
        earlier.write_bytes(b"an earlier attempt's file")
    assert killed_mid_run >= 1, "every kill came after the run had ended"
    insert(db, "crash", 90_000, 10)
    time.sleep(SETTLE_S)
    meta = materialized(p.materialize())  # the next run, after three killed ones
    assert meta is not None and meta["batch"] == 4 and meta["rows"] == 10
    batches = p.batches()  # checks: numbered 0..4, each manifest describes its own file
    assert [m["rows"] for m, _ in batches] == [1000, 100, 100, 100, 10]
    for (prev, _), (m, _) in zip(batches, batches[1:], strict=False):
        assert m["watermark"]["low"] == prev["watermark"]["high"]
        assert m["previous"]["run_id"] == prev["run_id"]
    assert latest_by_key(batches) == table_rows("crash")
    assert [f for f in p.sink().list_files() if "_staging/" in f] == []
    # each next run removed the lower version a killed run left of the batch before it: the
    # folder holds exactly the data files the manifests name
    named = {f"{paths.folder}/{m['file']}" for m, _ in batches}
    assert {f for f in p.sink().list_files(paths.folder) if paths.version_of(f)} == named


def test_a_run_that_lost_its_lock_cannot_commit_over_another(db, inc, adls, tmp_path):
    """Run A's session (and with it the table's lock) dies while A uploads batch 1's manifest;
    run B takes the table and commits batch 1 from its own, newer snapshot. A's late commit
    must not replace B's manifest, and nothing A does after may remove B's data file: batch 1
    ends as B's, with no data file that no manifest names."""
    create_table(db, "lost")
    insert(db, "lost", 1, 100)
    p = inc([{"table": "inc.lost", "cursor": "updated_at"}], bronze=adls_bronze(adls))
    time.sleep(SETTLE_S)
    materialized(p.materialize())  # batch 0
    insert(db, "lost", 1000, 50)
    time.sleep(SETTLE_S)
    paths = incremental_paths("test", p.config.tables[0].name)
    manifest_1 = paths.manifest(1).split("/", 2)[2]  # "<S>.<T>/incremental/lost-000001.json"
    release = threading.Event()
    fault = Fault("rename", path=manifest_1, mode="hang", delay=300, times=1, release=release)
    adls.faults.append(fault)
    (tmp_path / "home_a").mkdir()
    a = subprocess.Popen(
        [sys.executable, "-c", RUN, str(p.config.path)],
        env={**os.environ, "DAGSTER_HOME": str(tmp_path / "home_a")},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while fault.hits == 0:  # A is committing: its manifest's rename hangs
            assert time.monotonic() < deadline and a.poll() is None, "A never reached its commit"
            time.sleep(0.05)
        (killed,) = db.execute(  # the session holding the table's lock: A's
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
            " AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(%s, 0)",
            (incremental_spec(p.config, p.config.tables[0]).lock_key,),
        ).fetchone()
        assert killed == 1
        insert(db, "lost", 2000, 10)  # B's batch holds more than A's
        time.sleep(SETTLE_S)
        b = p.materialize()  # B: the table's lock is free again
        meta_b = materialized(b)
        release.set()  # A's rename is answered by a dropped connection; A goes on
        outcome_a = json.loads(a.communicate(timeout=180)[0].strip().splitlines()[-1])
    finally:
        release.set()
        if a.poll() is None:
            a.kill()
            a.communicate(timeout=30)
        adls.faults.clear()
    assert not outcome_a["success"], "A committed batch 1 after losing its lock"
    assert f"run {b.run_id} committed this batch" in outcome_a["failures"][0]
    batches = p.batches()  # each manifest describes its own file; no data file without one
    assert [(m["batch"], m["rows"]) for m, _ in batches] == [(0, 100), (1, 60)]
    assert batches[1][0]["run_id"] == b.run_id and meta_b is not None and meta_b["rows"] == 60
    assert batches[1][0]["file"] == "lost-000001-1.csv.gz"  # A's was version 0
    assert latest_by_key(batches) == table_rows("lost")


def test_a_commit_that_cannot_be_checked_deletes_nothing(db, inc, adls):
    """Batch 1's manifest rename happens but its answer is lost, and reading the lake back
    fails too: the run cannot tell whether it committed, so it must not delete the data file a
    committed manifest may name; the next run finds batch 1 committed and goes on."""
    create_table(db, "unsure")
    insert(db, "unsure", 1, 20)
    p = inc([{"table": "inc.unsure", "cursor": "updated_at"}], bronze=adls_bronze(adls))
    time.sleep(SETTLE_S)
    materialized(p.materialize())
    insert(db, "unsure", 100, 5)
    time.sleep(SETTLE_S)
    paths = incremental_paths("test", p.config.tables[0].name)
    manifest_1 = paths.manifest(1).split("/", 2)[2]
    adls.faults += [
        Fault("rename", path=manifest_1, mode="lost", times=1),
        Fault("props", path=manifest_1, status=503, code="ServerBusy", times=20),
        Fault("read", path=manifest_1, status=503, code="ServerBusy", times=20),
    ]
    result = p.materialize()
    adls.faults.clear()
    assert "could not be read back" in failure_message(result)
    sink = p.sink()
    manifest = json.loads(sink.read_bytes(paths.manifest(1)))  # it did commit
    assert f"{paths.folder}/{manifest['file']}" in sink.list_files(paths.folder)
    insert(db, "unsure", 200, 3)
    time.sleep(SETTLE_S)
    meta = materialized(p.materialize())
    assert meta is not None and meta["batch"] == 2 and meta["rows"] == 3
    batches = p.batches()
    assert [m["rows"] for m, _ in batches] == [20, 5, 3]
    assert latest_by_key(batches) == table_rows("unsure")

"""A run process killed (SIGKILL) after its batch's manifest landed but before the run ended:
the batch is committed, the next run continues from its watermark, and no batch is
duplicated or skipped. The kill is real: the materialization runs in its own process with its
own Dagster instance, and is killed the moment the manifest appears in Bronze."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus

from pg_assets.core.layout import incremental_paths
from pg_assets_tests import test_incremental as base
from pg_assets_tests.test_incremental import (
    SETTLE_S,
    create_table,
    insert,
    latest_by_key,
    materialized,
    table_rows,
)

inc, pinst = base.inc, base.pinst  # fixtures

RUN = """
import sys
from dagster import DagsterInstance
from pg_assets.build import build_definitions
from pg_assets.config import load_config

defs = build_definitions(load_config(sys.argv[1]))
job = defs.resolve_implicit_global_asset_job_def()
with DagsterInstance.get() as instance:
    result = job.execute_in_process(instance=instance, raise_on_error=False)
print("RUN ENDED", result.success, flush=True)
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
        code, status = run_and_kill_after_manifest(
            config_path, root / paths.manifest(attempt), tmp_path / f"home{attempt}"
        )
        assert code == -signal.SIGKILL
        # the run never ended: its own instance still has it running
        killed_mid_run += status == DagsterRunStatus.STARTED
        assert status in (DagsterRunStatus.STARTED, DagsterRunStatus.SUCCESS)
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

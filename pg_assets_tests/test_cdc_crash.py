"""Exactly once across real crashes: the run process is killed with SIGKILL at each point of the
protocol (files published but no batch manifest; manifest published but the slot not advanced;
while PostgreSQL executes the advance), then the next run recovers, and every committed change
is in Bronze exactly once (held against a test_decoding slot), the replay equals the table and
no orphan file is left.

The run is a real materialization in a child process. It is stopped at a chosen point by a
Python audit hook (`sys.addaudithook`: the process pauses inside the real `os.replace` of the
batch manifest, or inside the directory fsync that follows it), which the parent sees on the
child's stdout before it kills it; nothing in pg_assets is replaced or told about the test. The
advance is caught in `pg_stat_activity` while it runs.

Two more faults, on ADLS: a run whose PostgreSQL session (and with it the slot's lock) is
terminated while it commits, with a second run taking the lock and reading from the same slot
position; and a commit whose outcome cannot be read back.
"""

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.lsn import format_lsn
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import cdc_batch_manifest, cdc_folder, cdc_head, cdc_journal
from pg_assets_tests.adls_server import Fault
from pg_assets_tests.cdc_support import (  # noqa: F401
    Witness,
    assert_exactly_once,
    cdc_env,
    cdc_names,
    pinned_copy,
    raw_records,
    read_bronze_cdc,
    replay,
    wait_flushed,
)
from pg_assets_tests.conftest import adls_bronze

CHILD = r"""
import os, re, sys, time
path, mode = sys.argv[1], sys.argv[2]
manifest = re.compile(r"/_cdc/[a-z0-9_]+/[0-9A-F]{16}\.json$")
state = {"renamed": None, "paused": False}

def pause():
    state["paused"] = True
    print("PAUSED", flush=True)
    while True:
        time.sleep(60)

def hook(event, args):
    if state["paused"]:
        return
    if event == "os.rename" and manifest.search(str(args[1])):
        if mode == "before_manifest":
            pause()
        state["renamed"] = os.path.dirname(str(args[1]))
    elif event == "open" and mode == "after_manifest" and str(args[0]) == state["renamed"]:
        pause()  # the manifest is in place; its directory fsync comes next, then the advance

sys.addaudithook(hook)
from dagster import DagsterInstance
from pg_assets.build import build_definitions
from pg_assets.config import load_config

config = load_config(path)
defs = build_definitions(config)
with DagsterInstance.ephemeral() as instance:
    job = defs.resolve_job_def(config.source + "__cdc")
    result = job.execute_in_process(instance=instance, raise_on_error=False)
print("DONE", result.success, flush=True)
"""

MODES = ["before_manifest", "before_manifest_head_lost", "after_manifest", "during_advance"]


def _writes(db: psycopg.Connection, t: sql.Composable, base: int, n: int = 12) -> None:
    """Small transactions of every kind, some changing the key."""
    for i in range(n):
        k = base + i
        with db.transaction():
            db.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, 0)").format(t), [k, f"v{k}"])
            db.execute(sql.SQL("UPDATE {} SET n = n + 1 WHERE id = %s").format(t), [1 + i])
        if i % 3 == 0:
            db.execute(sql.SQL("UPDATE {} SET id = %s WHERE id = %s").format(t), [-k, 100 + i])
        if i % 4 == 0:
            db.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(t), [200 + i])


def _run_in_process(proj):
    job = proj.defs.resolve_job_def("shop__cdc")
    return job.execute_in_process(instance=proj.instance, raise_on_error=False)


def _crash(config_path: str, mode: str, log, db, conninfo: str) -> bool:
    """Run the job in a child process and SIGKILL it at `mode`'s point. Returns whether the
    kill landed where asked (the advance seen running, for `during_advance`)."""
    child_mode = mode.removesuffix("_head_lost")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, config_path, child_mode],
        stdout=subprocess.PIPE, stderr=log, text=True, env=os.environ,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        if mode == "during_advance":
            with psycopg.connect(conninfo, autocommit=True) as watch:
                while time.monotonic() < deadline and proc.poll() is None:
                    row = watch.execute(
                        "SELECT pid FROM pg_stat_activity WHERE state = 'active'"
                        " AND application_name LIKE 'pg_assets cdc %'"
                        " AND query LIKE '%pg_replication_slot_advance%'"
                    ).fetchone()
                    if row is not None:
                        os.kill(proc.pid, signal.SIGKILL)
                        return True
            return False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
            if line.startswith("PAUSED"):
                os.kill(proc.pid, signal.SIGKILL)
                return True
            if not line:
                return False  # ended (or timed out) without pausing
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", MODES)
def test_kill_9_at_each_point_then_exactly_once(
    mode,
    db,
    cdc_env,  # noqa: F811
    project,
    pg_conninfo,
    tmp_path,
):
    s, slot, pub = cdc_env
    t, proj = _snapshotted_orders(db, s, slot, pub, project)
    witness = Witness.create(db, f"{slot}_w")
    try:
        _writes(db, t, 1000)
        if mode == "during_advance":
            # WAL the advance has to read through: a wide enough window to catch it running
            db.execute(sql.SQL("CREATE TABLE {} (id int, v text)").format(sql.Identifier(s, "x")))
            db.execute(
                sql.SQL("INSERT INTO {} SELECT g, md5(g::text) FROM generate_series(1, 400000) g")
                .format(sql.Identifier(s, "x"))
            )  # fmt: skip
            _writes(db, t, 1100, n=2)
        wait_flushed(db)
        sink = proj.sink()
        start = cdc_slot.slot_health(db, slot).confirmed_flush_lsn  # type: ignore[union-attr]
        with open(tmp_path / "child.log", "w") as log:
            assert _crash(str(proj.config.path), mode, log, db, pg_conninfo), (
                tmp_path / "child.log"
            ).read_text()[-3000:]

        journal = cdc_journal("shop", slot)
        manifests = [f for f in sink.list_files(journal) if not f.endswith("_head.json")]
        head = json.loads(sink.read_bytes(cdc_head("shop", slot)))
        confirmed = cdc_slot.slot_health(db, slot).confirmed_flush_lsn  # type: ignore[union-attr]
        files = sink.list_files(cdc_folder("shop", QualifiedName(s, "orders")))
        changes = [f for f in files if "-snapshot-" not in f]
        if mode.startswith("before_manifest"):
            # published change files, no manifest committing them, the slot where it was
            assert changes and manifests == [] and confirmed == start
            assert head["pending"]["kind"] == "batch" and head["pending"]["files"] == changes
            if mode == "before_manifest_head_lost":
                sink.delete(cdc_head("shop", slot))
        elif mode == "after_manifest":
            (manifest,) = manifests
            end = json.loads(sink.read_bytes(manifest))["end_lsn"]
            assert confirmed == start < int(end, 16)  # committed, not consumed
        else:
            (manifest,) = manifests
            end = int(json.loads(sink.read_bytes(manifest))["end_lsn"], 16)
            print(f"slot after the kill: {format_lsn(confirmed)} (batch end {format_lsn(end)})")
            assert confirmed in (start, end)  # the advance happened whole, or not at all

        _writes(db, t, 2000)  # more changes before the next run
        wait_flushed(db)
        result = _run_in_process(proj)
        assert result.success
        bronze = read_bronze_cdc(sink, "shop", slot, QualifiedName(s, "orders"))
        assert_exactly_once(bronze.changes, witness.counts(db, QualifiedName(s, "orders")))
        recs = raw_records(pinned_copy(db, sql.SQL("SELECT * FROM {}").format(t)))
        final = recs[0], {(r[0],): r for r in recs[1:]}
        assert replay(bronze.snapshot, bronze.changes, ["id"]) == final
        head = json.loads(sink.read_bytes(cdc_head("shop", slot)))
        assert head["pending"] is None
        health = cdc_slot.slot_health(db, slot)
        assert (
            health is not None
            and head["committed"]["end_lsn"] == f"{health.confirmed_flush_lsn:016X}"
        )
    finally:
        witness.drop(db)


RUN = r"""
import json, sys
from dagster import DagsterInstance
from pg_assets.build import build_definitions
from pg_assets.config import load_config

config = load_config(sys.argv[1])
with DagsterInstance.ephemeral() as instance:
    job = build_definitions(config).resolve_job_def(config.source + "__cdc")
    result = job.execute_in_process(instance=instance, raise_on_error=False)
failures = [e.step_failure_data.error.message for e in result.all_events
            if e.event_type_value == "STEP_FAILURE"]
print(json.dumps({"success": result.success, "failures": failures}), flush=True)
"""


def _snapshotted_orders(db, s: str, slot: str, pub: str, project, **bronze):
    """A CDC table `orders` of 300 rows, snapshotted by a first run."""
    t = sql.Identifier(s, "orders")
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text, n int)").format(t))
    db.execute(
        sql.SQL("INSERT INTO {} SELECT g, md5(g::text), 0 FROM generate_series(1, 300) g")
        .format(t)
    )  # fmt: skip
    proj = project(
        [{"table": f"{s}.orders", "mode": "cdc"}],
        source="shop",
        cdc={"slot": slot, "publication": pub},
        **bronze,
    )
    assert _run_in_process(proj).success  # the snapshot
    return t, proj


def _exactly_once_and_replayed(db, sink, s: str, slot: str, witness: Witness) -> None:
    """Every committed change exactly once, the chain of batches complete, no orphan, the replay
    equal to the table, and the slot where the lake ends."""
    table = QualifiedName(s, "orders")
    bronze = read_bronze_cdc(sink, "shop", slot, table)
    assert_exactly_once(bronze.changes, witness.counts(db, table))
    recs = raw_records(pinned_copy(db, sql.SQL("SELECT * FROM {}").format(table.identifier)))
    assert replay(bronze.snapshot, bronze.changes, ["id"]) == (
        recs[0],
        {(r[0],): r for r in recs[1:]},
    )
    head = json.loads(sink.read_bytes(cdc_head("shop", slot)))
    health = cdc_slot.slot_health(db, slot)
    assert health is not None
    assert head["committed"]["end_lsn"] == f"{health.confirmed_flush_lsn:016X}"


def test_a_run_that_lost_its_lock_cannot_commit_a_second_batch_from_its_start(
    db,
    cdc_env,  # noqa: F811
    project,
    adls,
):
    """Run A reads the batch from slot position S and, while its manifest's upload hangs, its
    PostgreSQL session (the slot's lock) is terminated. Run B takes the lock, reads from S too
    (the slot has not moved), more than A did, and commits. A's late commit must fail, and A
    must not take B's files with it: every change once, the chain intact, no orphan."""
    s, slot, pub = cdc_env
    t, proj = _snapshotted_orders(db, s, slot, pub, project, bronze=adls_bronze(adls))
    witness = Witness.create(db, f"{slot}_w")
    a = None
    release = threading.Event()
    try:
        _writes(db, t, 1000)
        wait_flushed(db)
        start = cdc_slot.slot_health(db, slot).confirmed_flush_lsn  # type: ignore[union-attr]
        manifest = cdc_batch_manifest("shop", slot, start)
        fault = Fault("rename", path=manifest, mode="hang", delay=300, times=1, release=release)
        adls.faults.append(fault)
        a = subprocess.Popen(
            [sys.executable, "-c", RUN, str(proj.config.path)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while fault.hits == 0:  # A is committing: its manifest's rename hangs
            assert time.monotonic() < deadline and a.poll() is None, "A never reached its commit"
            time.sleep(0.05)
        (killed,) = db.execute(  # the session holding the slot's lock: A's
            "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a"
            " WHERE a.application_name LIKE 'pg_assets cdc %' AND EXISTS (SELECT FROM pg_locks l"
            " WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted)"
        ).fetchone()
        assert killed == 1
        _writes(db, t, 2000)  # B's batch holds more than A's
        wait_flushed(db)
        b = _run_in_process(proj)  # B: the slot's lock is free again
        assert b.success
        release.set()  # A's rename is answered by a dropped connection; A goes on
        outcome_a = json.loads(a.communicate(timeout=180)[0].strip().splitlines()[-1])
        assert not outcome_a["success"], "A committed a second batch from the same position"
        assert (
            f"run {b.run_id} committed the batch from {format_lsn(start)}"
            in outcome_a["failures"][0]
        )
        sink = proj.sink()
        assert json.loads(sink.read_bytes(manifest))["run_id"] == b.run_id
        _exactly_once_and_replayed(db, sink, s, slot, witness)
    finally:
        release.set()
        if a is not None and a.poll() is None:
            a.kill()
            a.communicate(timeout=30)
        adls.faults.clear()
        witness.drop(db)


def test_a_commit_that_cannot_be_checked_deletes_nothing(
    db,
    cdc_env,  # noqa: F811
    project,
    adls,
):
    """The batch manifest's rename happens but its answer is lost, and reading the lake back
    fails too: the run cannot tell whether it committed, so it must not delete the change files
    a committed manifest may name; the next run finds the batch committed, advances the slot
    and goes on."""
    s, slot, pub = cdc_env
    t, proj = _snapshotted_orders(db, s, slot, pub, project, bronze=adls_bronze(adls))
    witness = Witness.create(db, f"{slot}_w")
    try:
        _writes(db, t, 1000)
        wait_flushed(db)
        start = cdc_slot.slot_health(db, slot).confirmed_flush_lsn  # type: ignore[union-attr]
        manifest = cdc_batch_manifest("shop", slot, start)
        adls.faults += [
            Fault("rename", path=manifest, mode="lost", times=1),
            # after the run's first look for a committed batch from S (nth=2): every check of
            # the commit fails
            Fault("props", nth=2, path=manifest, status=503, code="ServerBusy", times=20),
            Fault("read", path=manifest, status=503, code="ServerBusy", times=20),
        ]
        result = _run_in_process(proj)
        adls.faults.clear()
        assert not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "could not be read back" in failure.step_failure_data.error.message
        sink = proj.sink()
        committed = json.loads(sink.read_bytes(manifest))  # it did commit
        present = set(sink.list_files(cdc_folder("shop", QualifiedName(s, "orders"))))
        assert committed["files"] and {f["path"] for f in committed["files"]} <= present
        assert cdc_slot.slot_health(db, slot).confirmed_flush_lsn == start  # type: ignore[union-attr]
        _writes(db, t, 2000)
        wait_flushed(db)
        assert _run_in_process(proj).success  # settles the batch, advances, reads the rest
        _exactly_once_and_replayed(db, sink, s, slot, witness)
    finally:
        adls.faults.clear()
        witness.drop(db)

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
"""

import json
import os
import select
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.lsn import format_lsn
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import cdc_folder, cdc_head, cdc_journal
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
    )
    assert _run_in_process(proj).success  # the snapshot
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

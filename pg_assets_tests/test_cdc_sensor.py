"""The CDC sensor, ticked by the sensor daemon's own iteration code against a real instance: it
is stopped by default; once started it requests the setup run, then a run only when changes
are pending, never while a run of the job is queued or running, with run keys from the slot's
LSNs; the requested runs execute (synchronously here) and change files land in Bronze."""

import logging
import time
from pathlib import Path

import yaml
from dagster import DagsterRunStatus, DefaultSensorStatus
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.test_utils import create_test_daemon_workspace_context, instance_for_test
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.sensor import execute_sensor_iteration
from psycopg import sql

from pg_assets.build import build_definitions
from pg_assets.config import load_config
from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.lsn import format_lsn
from pg_assets.core.identifiers import QualifiedName
from pg_assets.sinks.local import LocalSink
from pg_assets_tests.cdc_support import cdc_env, cdc_names, read_bronze_cdc, wait_flushed  # noqa: F401


def _ticks(instance, sensor):
    ticks = instance.get_ticks(sensor.get_remote_origin_id(), sensor.selector_id)
    return sorted(ticks, key=lambda t: t.timestamp)


def _tick(context, instance, sensor):
    """One daemon iteration (past the sensor's minimum interval); the new tick."""
    before = len(_ticks(instance, sensor))
    time.sleep(1.05)  # minimum_interval_seconds = 1: the daemon skips a sensor ticked sooner
    list(execute_sensor_iteration(context, logging.getLogger("test"), None, None))
    ticks = _ticks(instance, sensor)
    assert len(ticks) == before + 1
    return ticks[-1]


def test_sensor_as_the_daemon_runs_it(db, cdc_env, tmp_path: Path):  # noqa: F811
    s, slot, pub = cdc_env
    t = sql.Identifier(s, "events")
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(t))
    db.execute(sql.SQL("INSERT INTO {} VALUES (1, 'one')").format(t))
    config = tmp_path / "pg_assets.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "source": "shop",
                "bronze": {"root": str(tmp_path / "bronze")},
                "cdc": {"slot": slot, "publication": pub, "poll_interval_s": 1},
                "tables": [{"table": f"{s}.events", "mode": "cdc"}],
            }
        )
    )
    defs_file = tmp_path / "defs.py"
    defs_file.write_text(
        "from pg_assets.build import build_definitions\n"
        "from pg_assets.config import load_config\n"
        f"defs = build_definitions(load_config({str(config)!r}))\n"
    )
    target = InProcessWorkspaceLoadTarget(
        InProcessCodeLocationOrigin(
            LoadableTargetOrigin(python_file=str(defs_file), attribute="defs"),
            location_name="pg_assets_test",
        )
    )
    with (
        instance_for_test(synchronous_run_coordinator=True, synchronous_run_launcher=True) as inst,
        create_test_daemon_workspace_context(target, inst) as context,
    ):
        location = next(
            iter(context.create_request_context().get_code_location_entries().values())
        ).code_location
        assert location is not None
        (repo,) = location.get_repositories().values()
        sensor = repo.get_sensor("shop__cdc_sensor")
        assert sensor.default_status == DefaultSensorStatus.STOPPED
        list(execute_sensor_iteration(context, logging.getLogger("test"), None, None))
        assert _ticks(inst, sensor) == [] and inst.get_runs() == []  # stopped: never ticks

        inst.start_sensor(sensor)
        tick = _tick(context, inst, sensor)  # no slot yet: the first run sets it up
        assert tick.status == TickStatus.SUCCESS and tick.run_keys[0].startswith(f"{slot}:create:")
        (setup,) = inst.get_runs()
        assert setup.status == DagsterRunStatus.SUCCESS
        assert cdc_slot.slot_exists(db, slot)

        tick = _tick(context, inst, sensor)
        assert tick.status == TickStatus.SKIPPED, tick.run_keys
        assert (
            "no published change pending" in tick.skip_reason or "nothing new" in tick.skip_reason
        )

        db.execute(sql.SQL("INSERT INTO {} VALUES (2, 'two'), (3, 'three')").format(t))
        wait_flushed(db)
        health = cdc_slot.slot_health(db, slot)
        assert health is not None and health.confirmed_flush_lsn is not None
        tick = _tick(context, inst, sensor)
        assert tick.status == TickStatus.SUCCESS
        (key,) = tick.run_keys
        assert key.startswith(f"{slot}:{format_lsn(health.confirmed_flush_lsn)}:")
        run = inst.get_run_by_id(tick.run_ids[0])
        assert run is not None and run.status == DagsterRunStatus.SUCCESS
        bronze = read_bronze_cdc(
            LocalSink(tmp_path / "bronze"), "shop", slot, QualifiedName(s, "events")
        )
        assert b"2,two" in b"".join(bronze.changes) and b"3,three" in b"".join(bronze.changes)

        # a run of the job queued (say, behind the instance's run limit): no second request
        job = build_definitions(load_config(config)).resolve_job_def("shop__cdc")
        remote_job = repo.get_full_job("shop__cdc")
        queued = inst.create_run_for_job(
            job,
            status=DagsterRunStatus.QUEUED,
            remote_job_origin=remote_job.get_remote_origin(),
            job_code_origin=remote_job.get_python_origin(),
        )
        db.execute(sql.SQL("UPDATE {} SET v = 'uno' WHERE id = 1").format(t))
        wait_flushed(db)
        tick = _tick(context, inst, sensor)
        assert tick.status == TickStatus.SKIPPED
        assert tick.skip_reason == (
            f"run {queued.run_id[:8]} (shop__cdc) is queued; waiting for it to finish"
        )
        inst.report_run_canceled(queued)
        tick = _tick(context, inst, sensor)
        assert tick.status == TickStatus.SUCCESS and tick.run_keys[0] != key
        assert len(inst.get_runs()) == 4  # setup, changes, the canceled one, this one
        tick = _tick(context, inst, sensor)
        assert tick.status == TickStatus.SKIPPED

        # a dropped slot with history in Bronze: no run that could only fail, the fix instead
        db.execute("SELECT pg_drop_replication_slot(%s)", [slot])
        tick = _tick(context, inst, sensor)
        assert tick.status == TickStatus.SKIPPED
        assert "does not exist but Bronze holds CDC data" in tick.skip_reason
        assert "`pg-assets cdc setup`" in tick.skip_reason

"""One sensor per source with CDC tables: `<source>__cdc_sensor`, stopped by default.

Each tick (at most every `cdc.poll_interval_s`):

1. If a run of the source's CDC job, or any run materializing one of its CDC assets (a manual
   materialization from the UI), is queued or running, skip: one run at a time consumes the
   slot, and a second one queued behind it would only find what the first already took.
2. Read the slot cheaply (`pg_assets.core.cdc.run.poll`): its catalog row, then, only when
   the server wrote WAL since the slot's position, a peek that stops after the first decoded
   transaction. Request a run when changes are pending, when WAL without published changes
   passed the heartbeat threshold (the run moves the slot past it), when the slot is missing
   (the run sets it up) or lost or about to be (the run reports it through the check).

The run key is the slot's position and the server's WAL position: a tick never requests the
same work twice, and after a failed run the next request waits for new WAL. Start the sensor
in the UI, or with `dagster sensor start <source>__cdc_sensor`.
"""

from collections.abc import Sequence

import psycopg
from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES

from pg_assets.config import ProjectConfig
from pg_assets.core.cdc.run import HEARTBEAT_BYTES, poll
from pg_assets.core.layout import cdc_head
from pg_assets.core.session import connect_kwargs, read_conninfo


def sensor_name(source: str) -> str:
    return f"{source}__cdc_sensor"


def run_in_flight(
    context: SensorEvaluationContext, job_name: str, keys: Sequence[AssetKey]
) -> str | None:
    """A queued or running run that would consume the slot: its description, or None."""
    wanted = set(keys)
    for run in context.instance.get_runs(RunsFilter(statuses=NOT_FINISHED_STATUSES), limit=200):
        if run.job_name == job_name or wanted & set(run.asset_selection or ()):
            return f"run {run.run_id[:8]} ({run.job_name}) is {run.status.value.lower()}"
    return None


def _has_history(project: ProjectConfig) -> bool:
    """Whether Bronze holds this slot's journal head (one small stat)."""
    from pg_assets.build import build_resources

    sink = build_resources(project)["bronze"].get_sink()  # type: ignore[attr-defined]
    return sink.stat(cdc_head(project.source, project.slot_name)) is not None


def build_cdc_sensor(
    project: ProjectConfig, job_name: str, keys: Sequence[AssetKey]
) -> SensorDefinition:
    pg = project.postgres
    slot, publication = project.slot_name, project.publication_name
    heartbeat_bytes = min(HEARTBEAT_BYTES, int(project.cdc.max_lag_mb * (1 << 20)) // 2)

    @sensor(
        name=sensor_name(project.source),
        job_name=job_name,
        minimum_interval_seconds=max(1, int(project.cdc.poll_interval_s)),
        default_status=DefaultSensorStatus.STOPPED,
        description=f"Requests a CDC run of source {project.source!r} when replication slot "
        f"{slot!r} has changes pending (never while one is queued or running).",
    )
    def _cdc_sensor(context: SensorEvaluationContext) -> RunRequest | SkipReason:
        busy = run_in_flight(context, job_name, keys)
        if busy:
            return SkipReason(f"{busy}; waiting for it to finish")
        try:
            conninfo = read_conninfo(pg.conninfo_env)
            with psycopg.connect(
                conninfo,
                autocommit=True,
                **connect_kwargs(min(pg.connect_timeout_s, 10), 30, conninfo),  # type: ignore[arg-type]
            ) as conn:
                decision = poll(conn, slot, publication, heartbeat_bytes=heartbeat_bytes)
        except (psycopg.Error, RuntimeError) as e:
            return SkipReason(f"cannot read replication slot {slot!r}: {e}")
        if decision.run_key is None:
            return SkipReason(decision.reason)
        try:
            dropped = decision.run_key.startswith(f"{slot}:create:") and _has_history(project)
        except Exception as e:  # Bronze unreachable: say so rather than fail the tick
            return SkipReason(f"cannot read Bronze for replication slot {slot!r}: {e}")
        if dropped:
            return SkipReason(
                f"replication slot {slot!r} does not exist but Bronze holds CDC data of this "
                "source: it was dropped, and a run would only fail. Run `pg-assets cdc setup` "
                "to create it and re-snapshot every CDC table"
            )
        context.log.info(decision.reason)
        return RunRequest(
            run_key=decision.run_key,
            tags={"pg_assets/cdc_slot": slot, "pg_assets/cdc_reason": decision.reason[:200]},
        )

    return _cdc_sensor

"""One sensor per incremental table: poll cheaply, request a batch only when there is one.

Each tick, in this order (cheapest first):

1. **A run in flight?** If the asset's latest planned materialization, or any run this sensor
   requested for the table, is queued or running, skip: never a second run of the same table.
   (The table's advisory lock would serialize two runs anyway; this keeps them from piling up.)
2. **The lake's watermark.** The sensor's cursor remembers the newest committed batch and the
   manifest's size and etag; two `stat`s confirm it (that manifest unchanged, the next one
   absent). Otherwise the newest manifest is found again and read. Nothing comes from the
   Dagster instance, so wiping it changes nothing.
3. **The table.** One statement reads the open transactions (the cap), one indexed
   `max(cursor)` below the cap says whether a batch could take anything above the watermark.

The run key is derived from what was seen: the batch number, the watermark it continues from,
the newest cursor value it can take, and an attempt number. A run that ends without moving the
watermark (it failed, or found nothing after all) is retried with the next attempt number after
a backoff of `poll_interval_s × 2^(attempt − 1)`, at most an hour.
"""

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from pg_assets.core.incremental import MARGIN_S, IncrementalSpec, latest_manifest, poll
from pg_assets.core.layout import IncrementalPaths, table_folder
from pg_assets.core.session import connect_kwargs, read_conninfo
from pg_assets.resources.bronze import BronzeResource
from pg_assets.resources.postgres import PostgresResource
from pg_assets.sinks.base import Sink

TABLE_TAG = "pg_assets/incremental_table"  # the table's Bronze folder
REQUEST_TAG = "pg_assets/request"  # hash of the state a run was requested for
BATCH_HINT_TAG = "pg_assets/batch_hint"  # newest committed batch the sensor saw
IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]
POLL_TIMEOUT_S = 30  # statement and lock waits of one tick
MAX_BACKOFF_S = 3600


def sensor_name(op_name: str) -> str:
    return f"{op_name}__sensor"


def in_flight_run(instance: DagsterInstance, key: AssetKey, folder: str) -> DagsterRun | None:
    """A queued or running run that materializes this table, from whatever launched it."""
    planned = instance.get_latest_planned_materialization_info(key)
    if planned is not None:
        run = instance.get_run_by_id(planned.run_id)
        if run is not None and run.status in IN_FLIGHT:
            return run
    runs = instance.get_runs(RunsFilter(tags={TABLE_TAG: folder}, statuses=IN_FLIGHT), limit=1)
    return runs[0] if runs else None


def lake_state(
    sink: Sink, paths: IncrementalPaths, cached: dict[str, Any]
) -> dict[str, Any] | None:
    """The newest committed batch: confirmed from the cursor with two stats, else re-read."""
    batch = cached.get("batch")
    if batch is not None:
        info = sink.stat(paths.manifest(batch))
        if (
            info is not None
            and [info.size, info.etag] == [cached.get("size"), cached.get("etag")]
            and sink.stat(paths.manifest(batch + 1)) is None
        ):
            return {k: cached[k] for k in ("batch", "high", "kind", "size", "etag")}
    manifest = latest_manifest(sink, paths, hint=batch)
    if manifest is None:
        return None
    info = sink.stat(paths.manifest(manifest["batch"]))
    return {
        "batch": manifest["batch"],
        "high": manifest["watermark"]["high"],
        "kind": manifest["cursor"]["kind"],
        "size": info.size if info else None,
        "etag": info.etag if info else None,
    }


@contextmanager
def _connect(postgres: PostgresResource) -> Iterator[psycopg.Connection]:
    timeout = min(postgres.statement_timeout_s or POLL_TIMEOUT_S, POLL_TIMEOUT_S)
    conninfo = read_conninfo(postgres.conninfo_env)
    kwargs = connect_kwargs(
        postgres.connect_timeout_s, timeout, conninfo, lock_timeout_s=POLL_TIMEOUT_S
    )
    with psycopg.connect(conninfo, **kwargs, autocommit=True) as conn:  # type: ignore[arg-type]
        yield conn


def _next_attempt(
    instance: DagsterInstance, request: str, interval_s: float, now: float
) -> tuple[int, float]:
    """(attempt number, seconds still to wait) for a run of the state hashed as `request`."""
    tag = {REQUEST_TAG: request}
    records = instance.get_run_records(RunsFilter(tags=tag), limit=1)
    if not records:
        return 0, 0.0
    done = instance.get_runs_count(RunsFilter(tags=tag))
    ended = records[0].end_time or records[0].create_timestamp.timestamp()
    backoff = min(MAX_BACKOFF_S, interval_s * 2 ** (done - 1))
    return done, max(0.0, ended + backoff - now)


def evaluate(
    context: SensorEvaluationContext,
    *,
    spec: IncrementalSpec,
    key: AssetKey,
    postgres: PostgresResource,
    bronze: BronzeResource,
    poll_interval_s: float,
    margin_s: float = MARGIN_S,
) -> SensorResult:
    """One tick; see the module docstring."""
    folder = table_folder(spec.source, spec.table)
    cached: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
    busy = in_flight_run(context.instance, key, folder)
    if busy is not None:
        status = busy.status.value.lower().replace("_", " ")
        return SensorResult(
            skip_reason=f"run {busy.run_id} of {spec.table} is {status}; waiting for it to end",
            cursor=context.cursor,
        )
    try:
        lake = lake_state(bronze.get_sink(), spec.paths, cached)
        if lake is None:
            candidate, newer, why = None, True, "no batch in Bronze yet: batch 0 (full snapshot)"
            state = "batch=0"
        else:
            with _connect(postgres) as conn:
                p = poll(
                    conn, table=spec.table, cursor=spec.cursor, kind=lake["kind"],
                    after=lake["high"], timezone=spec.timezone, margin_s=margin_s,
                )  # fmt: skip
            candidate, newer = p.candidate, p.newer
            batch, high = lake["batch"] + 1, lake["high"]
            state = f"batch={batch}:after={high}:upto={candidate}"
            if newer:
                why = f"rows up to {candidate} above the watermark {high}"
            elif p.waiting:
                why = (
                    f"rows up to {p.newest} are above the watermark {high}, but none can be "
                    f"taken yet: {p.cap.reason}"
                )
            else:
                why = f"no row above the watermark {high} (batch {batch - 1})"
    except Exception as e:  # the tick fails in the UI with this message; the cursor stays
        raise RuntimeError(f"table {spec.table}: the sensor could not poll: {e}") from e
    now = dt.datetime.now(dt.UTC)
    new_cursor = json.dumps(
        {**(lake or {}), "seen": candidate, "checked_at": now.isoformat(), "state": state}
    )
    if not newer:
        return SensorResult(skip_reason=why, cursor=new_cursor)
    request = hashlib.sha256(f"{folder}|{state}".encode()).hexdigest()[:16]
    attempt, wait = _next_attempt(context.instance, request, poll_interval_s, now.timestamp())
    if wait > 0:
        return SensorResult(
            skip_reason=f"{why}, but the last run for it ended without a new batch; trying "
            f"again in {wait:.0f} s (retry {attempt})",
            cursor=new_cursor,
        )
    tags = {TABLE_TAG: folder, REQUEST_TAG: request}
    if lake is not None:
        tags[BATCH_HINT_TAG] = str(lake["batch"])
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=f"{spec.table}:{state}:attempt={attempt}",
                asset_selection=[key],
                tags=tags,
            )
        ],
        cursor=new_cursor,
    )


def build_incremental_sensor(
    spec: IncrementalSpec, key: AssetKey, op_name: str, poll_interval_s: float
) -> SensorDefinition:
    @sensor(
        name=sensor_name(op_name),
        asset_selection=[key],
        minimum_interval_seconds=max(1, round(poll_interval_s)),
        default_status=DefaultSensorStatus.STOPPED,
        description=f"Requests the next incremental batch of {spec.table} when rows above "
        f"its watermark can be taken (polls every {poll_interval_s:g} s).",
    )
    def _sensor(
        context: SensorEvaluationContext, postgres: PostgresResource, bronze: BronzeResource
    ) -> SensorResult:
        return evaluate(
            context, spec=spec, key=key, postgres=postgres, bronze=bronze,
            poll_interval_s=poll_interval_s,
        )  # fmt: skip

    return _sensor

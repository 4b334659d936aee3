"""One daily-partitioned asset per configured table; one run extracts one day or many.

A schedule's run covers one day; a backfill's runs cover up to `max_partitions_per_run` days
each (`BackfillPolicy.multi_run`), because a run costs seconds of process start, code load and
bookkeeping whatever it does, while a ~1,000-row day costs a few hundredths of a second.

Inside a run every day is still its own unit, exactly as a single-day run: planned, extracted,
published and manifested on its own (`extract_one_day`), and recorded as its own
`AssetMaterialization(partition=day)` carrying that day's rows, bytes, seconds, relation and
sha256. The asset has `output_required=False` and yields no output: Dagster then records exactly
the materializations we yield, one per finished day, instead of stamping one result's metadata
on every day of the range (dagster#18123).

A day that fails fails only itself: the run goes on with the other days, and fails at the end
naming each failed day and its cause. The backfill daemon and the partition status count the
days materialized by the failed run as materialized and only the rest of its range as failed.
A lost connection is retried with RetryRequested; the retry skips the days this run already
materialized (read back from the run's own event log), so only the failed days are redone.
A run first sweeps `_staging/` of leftovers of killed runs (`BronzeResource.sweep_staging_once`).
Assets of one source share a Dagster concurrency pool named after the source, so a backfill
cannot open more connections than the instance allows for that database.
"""

import datetime as dt
import re
import warnings
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

import psycopg_pool
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetsDefinition,
    BackfillPolicy,
    BetaWarning,
    DagsterEventType,
    DailyPartitionsDefinition,
    Failure,
    MetadataValue,
    RetryRequested,
    TableColumn,
    TableSchema,
    asset,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
)

from pg_assets.catalog import ResolvedTable
from pg_assets.checks import (
    CHECK_NAMES,
    DayChecks,
    day_check_evaluations,
    day_checks_for,
)
from pg_assets.config import ProjectConfig, TableConfig
from pg_assets.core.compression import Codec
from pg_assets.core.errors import Classified, classify
from pg_assets.core.extract import (
    ExtractionError,
    ExtractResult,
    LeftoverFilesError,
    extract_day,
)
from pg_assets.core.planner import CatalogError, Column, TableInfo, describe_table
from pg_assets.resources.bronze import BronzeResource
from pg_assets.resources.postgres import PostgresResource
from pg_assets.sinks.base import Sink

# After this many days in a row fail with a lost connection, the rest of the range is not
# attempted in this try (each would wait out the connect timeout); the retry picks them up.
MAX_CONSECUTIVE_LOST = 2


def safe_name(text: str) -> str:
    """Dagster names allow only [A-Za-z0-9_]; PostgreSQL identifiers allow anything."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def asset_key(source: str, resolved: ResolvedTable | TableConfig) -> AssetKey:
    table = resolved.config if isinstance(resolved, ResolvedTable) else resolved
    return AssetKey([source, safe_name(table.name.schema), safe_name(table.name.name)])


def pool_name(source: str) -> str:
    return f"postgres_{source}"


def column_schema(columns: Iterable[Column]) -> TableSchema:
    """PostgreSQL columns as Dagster's column schema, shown natively in the UI."""
    return TableSchema(columns=[TableColumn(c.name, c.type) for c in columns])


def classified(
    error: BaseException, postgres: PostgresResource
) -> tuple[BaseException, Classified]:
    """The retry hook: the error to report, its kind and whether a retry can fix it
    (`pg_assets.core.errors`). A pool timeout hides the server's own words (a wrong password,
    a missing database): one direct connection asks for them, and they are reported instead."""
    kind = classify(error)
    if isinstance(error, psycopg_pool.PoolTimeout) or kind.kind == "no connection from the pool":
        cause = postgres.diagnose()
        if cause is not None:
            return cause, classify(cause)
    return error, kind


def _failure_or_retry(
    context: AssetExecutionContext,
    error: Exception,
    where: str,
    retries: int,
    postgres: PostgresResource,
) -> Exception:
    """For one unit of work (an incremental batch, a CDC run): retry only what a retry can
    fix (see `pg_assets.core.errors`); say which it was."""
    error, kind = classified(error, postgres)  # type: ignore[assignment]
    message = str(error) if isinstance(error, ExtractionError) else f"{where}: {error}"
    if kind.retryable and retries and context.retry_number < retries:
        wait = min(30, 2**context.retry_number)  # 1 s, 2 s, 4 s … capped at 30 s
        context.log.warning(f"{message} [{kind.kind}; retry in {wait} s]")
        return RetryRequested(max_retries=retries, seconds_to_wait=wait)
    suffix = " (not retried)" if not kind.retryable else f" (after {context.retry_number} retries)"
    return Failure(f"{message} [{kind.kind}{suffix}]")


@dataclass(frozen=True)
class DayJob:
    """Everything one day's extraction needs besides the day: the same for every day of a run."""

    source: str
    table: TableConfig
    info: TableInfo
    sink: Sink
    codec: Codec
    level: int
    run_id: str
    block_size: int
    lock_timeout_s: float
    content_hash: bool


def extract_one_day(postgres: PostgresResource, job: DayJob, day: dt.date) -> ExtractResult:
    """One day, end to end, exactly as a single-day run does it: the day's lock, its own
    snapshot (plan re-checked, COPY), publish and manifest (`extract_day`). Only the catalog
    description is shared with the other days of the run."""
    with postgres.connection() as conn:
        return extract_day(
            conn,
            source=job.source,
            table=job.table.name,
            column=job.table.column,
            day=day,
            timezone=job.table.timezone,
            sink=job.sink,
            codec=job.codec,
            level=job.level,
            run_id=job.run_id,
            block_size=job.block_size,
            info=job.info,
            lock_timeout_s=job.lock_timeout_s,
            content_hash=job.content_hash,
        )


def day_metadata(result: ExtractResult, info: TableInfo) -> dict[str, Any]:
    """A day's materialization metadata, from that day's own manifest."""
    m = result.manifest
    seconds = float(m.get("seconds") or 0)
    raw, compressed = int(m["raw_bytes"]), int(m["compressed_bytes"])
    return {
        "dagster/partition_row_count": int(m["rows"]),
        "dagster/uri": m["uri"],
        "dagster/column_schema": column_schema(info.columns),
        "rows": int(m["rows"]),
        "raw_bytes": MetadataValue.int(raw),
        "compressed_bytes": MetadataValue.int(compressed),
        "compression_ratio": MetadataValue.float(round(raw / compressed, 2) if compressed else 0.0),
        "seconds": MetadataValue.float(round(seconds, 3)),
        "mb_per_s": MetadataValue.float(round(raw / 1e6 / seconds, 1) if seconds else 0.0),
        "uri": MetadataValue.path(m["uri"]),
        "source_relation": str(m["source_relation"]),
        "strategy": str(m["strategy"]),
        "snapshot": MetadataValue.json(m["snapshot"]),
        "sha256": m["sha256"],
        "codec": f"{m['codec']}:{m['level']}",
    }


def materialized_in_this_run(context: AssetExecutionContext, key: AssetKey) -> set[str]:
    """Days of `key` this run has already recorded (by an earlier try of this step)."""
    conn = context.instance.get_records_for_run(
        context.run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION, limit=100_000
    )
    done = set()
    for record in conn.records:
        event = record.event_log_entry.dagster_event
        mat = event.step_materialization_data.materialization if event else None
        if mat is not None and mat.asset_key == key and mat.partition:
            done.add(mat.partition)
    return done


def selected_checks(
    context: AssetExecutionContext, project: ProjectConfig, table: TableConfig, key: AssetKey
) -> tuple[DayChecks, set[str]] | None:
    """The day checks this run selected for this asset (pg_assets.checks), if any."""
    if not project.checks_for(table).enabled:
        return None
    selection = context.run.asset_check_selection
    names = {
        name for name in CHECK_NAMES if selection is None or AssetCheckKey(key, name) in selection
    }
    return (day_checks_for(project, table, key), names) if names else None


def _cause(error: BaseException, kind: Classified | None = None) -> str:
    text = str(error) if isinstance(error, ExtractionError | Failure) else ""
    text = text or f"{type(error).__name__}: {error}"
    return f"{text} [{kind.kind}]" if kind is not None else text


def _days(days: list[dt.date]) -> str:
    """`2026-10-03`, `2026-10-01 ... 2026-10-30 (30 days)` or a short list."""
    if len(days) == 1:
        return days[0].isoformat()
    if (days[-1] - days[0]).days == len(days) - 1:
        return f"{days[0]} ... {days[-1]} ({len(days)} days)"
    shown = ", ".join(d.isoformat() for d in days[:10])
    return shown + (f" and {len(days) - 10} more" if len(days) > 10 else "")


def build_daily_asset(project: ProjectConfig, resolved: ResolvedTable) -> AssetsDefinition:
    table = resolved.config
    qname = table.name
    key = asset_key(project.source, resolved)
    code_version = table.fingerprint(project.bronze)
    partitions = DailyPartitionsDefinition(
        start_date=resolved.start.isoformat(), timezone=table.timezone
    )
    static_metadata: dict[str, object] = {
        "table": MetadataValue.text(str(qname)),
        "partition_column": MetadataValue.text(table.column),
        "timezone": MetadataValue.text(table.timezone),
        "first_day": MetadataValue.text(f"{resolved.start} (from {resolved.start_from})"),
        "config_file": MetadataValue.path(str(project.path)),
    }

    with warnings.catch_warnings():
        # backfill_policy is marked beta; said once here rather than in every process's log
        warnings.simplefilter("ignore", BetaWarning)
        return _define(project, table, key, resolved, partitions, static_metadata, code_version)


def _define(
    project: ProjectConfig,
    table: TableConfig,
    key: AssetKey,
    resolved: ResolvedTable,
    partitions: DailyPartitionsDefinition,
    static_metadata: dict[str, object],
    code_version: str,
) -> AssetsDefinition:
    qname = table.name
    retries = project.postgres.retries

    @asset(
        key=key,
        group_name=project.source,
        partitions_def=partitions,
        backfill_policy=BackfillPolicy.multi_run(project.max_partitions_per_run(table)),
        output_required=False,
        pool=pool_name(project.source),
        code_version=code_version,
        kinds={"postgres", "csv"},
        metadata=static_metadata,
        description=f"Daily extract of PostgreSQL table {qname} by {table.column} "
        f"({table.timezone} days) into Bronze.",
    )
    def _daily(
        context: AssetExecutionContext, postgres: PostgresResource, bronze: BronzeResource
    ) -> Iterator[AssetMaterialization | AssetCheckEvaluation]:
        days = [dt.date.fromisoformat(k) for k in context.partition_keys]
        span = days[0].isoformat() if len(days) == 1 else f"{days[0]}...{days[-1]}"
        where = f"table {qname}, partition {span}"
        early = [d for d in days if d < resolved.start]
        if early:
            raise Failure(f"{where}: {early[0]} is before the first day {resolved.start}")
        today = dt.datetime.now(ZoneInfo(table.timezone)).date()
        if unfinished := [d for d in days if d >= today]:
            # a day's file must hold the whole day: committed early, it would look complete
            raise Failure(
                f"{where}: {unfinished[0]} has not ended yet in {table.timezone} (today is "
                f"{today}); a day is extracted once it is over"
            )
        if context.retry_number > 0:
            done = materialized_in_this_run(context, key)
            days = [d for d in days if d.isoformat() not in done]
            context.log.info(f"{where}: try {context.retry_number + 1}, {len(days)} days left")
        if not days:
            return
        try:
            sink = bronze.get_sink()
        except Exception as e:  # bad root, missing secret, refused credential
            raise Failure(f"{where}: Bronze at {bronze.root} is not usable: {e}") from e
        bronze.sweep_staging_once(context, sink)
        try:
            # once per run, whatever the number of days; each day re-checks it in its snapshot
            with postgres.connection() as conn, conn.transaction():
                info = describe_table(conn, qname, table.column)
        except CatalogError as e:
            raise Failure(f"{where}: {e} (config key {e.key!r})") from None
        except Exception as e:
            error, kind = classified(e, postgres)
            failed = {d: error for d in days}
            _retry_or_fail(
                context, retries, f"table {qname}", span, failed, dict.fromkeys(days, kind)
            )
        job = DayJob(
            source=project.source,
            table=table,
            info=info,
            sink=sink,
            codec=bronze.get_codec(),
            level=bronze.get_level(),
            run_id=context.run.run_id,
            block_size=bronze.block_size,
            lock_timeout_s=project.postgres.lock_timeout_s,
            content_hash=project.checks_for(table).content_hash,
        )
        checks = selected_checks(context, project, table, key)
        failed: dict[dt.date, BaseException] = {}
        kinds: dict[dt.date, Classified] = {}
        lost_in_a_row = rows = 0
        for i, day in enumerate(days):
            if lost_in_a_row >= MAX_CONSECUTIVE_LOST:
                cause, kind = failed[days[i - 1]], kinds[days[i - 1]]
                for rest in days[i:]:
                    failed[rest], kinds[rest] = cause, kind
                context.log.warning(
                    f"{where}: {lost_in_a_row} days in a row lost the connection; "
                    f"{len(days) - i} days not attempted in this try"
                )
                break
            try:
                result = extract_one_day(postgres, job, day)
            except CatalogError as e:  # the table changed under the run: the same for every day
                raise Failure(f"table {qname}, partition {day}: {e} (config key {e.key!r})") from e
            except LeftoverFilesError as e:
                # the new version IS committed: record it, and fail the day for what remains
                result = e.result
                failed[day], kinds[day] = e, Classified(False, "superseded files left behind")
                context.log.error(str(e))
            except Exception as e:
                failed[day], kinds[day] = classified(e, postgres)
                lost_in_a_row = lost_in_a_row + 1 if kinds[day].retryable else 0
                context.log.error(f"table {qname}, partition {day}: {_cause(e, kinds[day])}")
                continue
            lost_in_a_row = 0
            rows += result.stats.rows
            # No log line per day: each is an event write, and the materialization below
            # already carries the day's relation, strategy and rows.
            yield AssetMaterialization(
                asset_key=key,
                partition=day.isoformat(),
                metadata=day_metadata(result, info),
                tags={
                    CODE_VERSION_TAG: code_version,
                    DATA_VERSION_TAG: result.manifest["sha256"],
                    DATA_VERSION_IS_USER_PROVIDED_TAG: "true",
                },
            )
            if checks is not None:
                # With no output, Dagster skips the check step downstream of this asset, so the
                # day's checks are evaluated here, right after the day is published.
                yield from _day_checks(context, checks, day, sink, postgres, info)
        context.log.info(
            f"{where}: {len(days) - len(failed)} of {len(days)} days published, {rows} rows"
        )
        if failed:
            _retry_or_fail(context, retries, f"table {qname}", span, failed, kinds)

    return _daily


def _day_checks(
    context: AssetExecutionContext,
    checks: tuple[DayChecks, Collection[str]],
    day: dt.date,
    sink: Sink,
    postgres: PostgresResource,
    info: TableInfo,
) -> Iterator[AssetCheckEvaluation]:
    """The day's checks, right after the day is published. A check that cannot run fails
    its own evaluation saying why, and the run goes on: its trouble is not the day's data's."""
    for result in day_check_evaluations(
        checks[0], [day], sink=sink, postgres=postgres, instance=context.instance,
        selected=checks[1], info=info, keep_going=True,
    ):  # fmt: skip
        if not result.passed and (result.description or "").startswith("could not run"):
            context.log.error(f"check {result.check_name}: {result.description}")
        yield result


def _retry_or_fail(
    context: AssetExecutionContext,
    retries: int,
    table: str,
    span: str,
    failed: dict[dt.date, BaseException],
    kinds: dict[dt.date, Classified],
) -> NoReturn:
    """End the step: another try when a failure a retry can fix (a lost connection, a lock
    timeout: see pg_assets.core.errors) happened and tries remain (the retry redoes only the
    days not materialized), else a failure naming every failed day, its cause and kind."""
    where = f"{table}, partition {span}"
    lost = [d for d in failed if kinds[d].retryable]
    if lost and context.retry_number < retries:
        wait = min(30, 2**context.retry_number)  # 1 s, 2 s, 4 s … capped at 30 s
        context.log.warning(
            f"{where}: {len(lost)} day(s) failed with {kinds[lost[0]].kind}; retrying "
            f"{len(failed)} day(s) in {wait} s (try {context.retry_number + 2} of {retries + 1})"
        )
        raise RetryRequested(max_retries=retries, seconds_to_wait=wait) from failed[lost[0]]
    by_cause: dict[str, list[dt.date]] = {}
    for day, error in sorted(failed.items()):
        by_cause.setdefault(_cause(error, kinds[day]), []).append(day)
    if len(failed) == 1:
        ((day, error),) = failed.items()
        text = _cause(error, kinds[day])
        summary = text if day.isoformat() in text else f"{table}, partition {day}: {text}"
    else:
        lines = [f"{_days(days)}: {cause}" for cause, days in by_cause.items()]
        summary = f"{where}: {len(failed)} day(s) failed:\n" + "\n".join(lines)
    if lost and retries:
        summary += f"\n(after {retries} retries)"
    elif not lost:
        summary += "\n(not retried: a retry cannot fix this)"
    raise Failure(
        description=summary,
        metadata={"failed_days": MetadataValue.json([d.isoformat() for d in sorted(failed)])},
    )

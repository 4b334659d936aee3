"""One daily-partitioned asset per configured table.

Each asset is a thin wrapper over `pg_assets.core.extract.extract_partition`: it turns the
partition key into a day, opens a snapshot on the pooled connection, plans the cheapest
correct COPY, streams it into Bronze and reports what landed as materialization metadata.
Assets of one source share a Dagster concurrency pool named after the source, so a backfill
cannot open more connections than the instance allows for that database.
"""

import datetime as dt
import re
from collections.abc import Iterable

import psycopg_pool
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DailyPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryRequested,
    TableColumn,
    TableSchema,
    asset,
)

from pg_assets.catalog import ResolvedTable
from pg_assets.config import ProjectConfig
from pg_assets.core.errors import classify
from pg_assets.core.extract import ExtractionError, extract_day
from pg_assets.core.planner import CatalogError, Column
from pg_assets.resources.bronze import BronzeResource
from pg_assets.resources.postgres import PostgresResource


def safe_name(text: str) -> str:
    """Dagster names allow only [A-Za-z0-9_]; PostgreSQL identifiers allow anything."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def asset_key(source: str, resolved: ResolvedTable) -> AssetKey:
    name = resolved.config.name
    return AssetKey([source, safe_name(name.schema), safe_name(name.name)])


def pool_name(source: str) -> str:
    return f"postgres_{source}"


def column_schema(columns: Iterable[Column]) -> TableSchema:
    """PostgreSQL columns as Dagster's column schema, shown natively in the UI."""
    return TableSchema(columns=[TableColumn(c.name, c.type) for c in columns])


def _failure_or_retry(
    context: AssetExecutionContext,
    error: Exception,
    where: str,
    retries: int,
    postgres: PostgresResource,
) -> Exception:
    """Retry only what a retry can fix (see `pg_assets.core.errors`); say which it was."""
    kind = classify(error)
    if isinstance(error, psycopg_pool.PoolTimeout) or kind.kind == "no connection from the pool":
        cause = postgres.diagnose()  # the server's own words: a wrong password, a missing db
        if cause is not None:
            error, kind = cause, classify(cause)
    message = str(error) if isinstance(error, ExtractionError) else f"{where}: {error}"
    if kind.retryable and retries and context.retry_number < retries:
        wait = min(30, 2**context.retry_number)  # 1 s, 2 s, 4 s … capped at 30 s
        context.log.warning(f"{message} [{kind.kind}; retry in {wait} s]")
        return RetryRequested(max_retries=retries, seconds_to_wait=wait)
    suffix = " (not retried)" if not kind.retryable else f" (after {context.retry_number} retries)"
    return Failure(f"{message} [{kind.kind}{suffix}]")


def build_daily_asset(project: ProjectConfig, resolved: ResolvedTable) -> AssetsDefinition:
    table = resolved.config
    qname = table.name
    key = asset_key(project.source, resolved)
    retries = project.postgres.retries
    partitions = DailyPartitionsDefinition(
        start_date=resolved.start.isoformat(), timezone=table.timezone
    )
    static_metadata: dict[str, object] = {
        "table": MetadataValue.text(str(qname)),
        "partition_column": MetadataValue.text(table.column),
        "timezone": MetadataValue.text(table.timezone),
        "config_file": MetadataValue.path(str(project.path)),
    }
    if resolved.info is not None:
        static_metadata["dagster/column_schema"] = column_schema(resolved.info.columns)

    @asset(
        key=key,
        group_name=project.source,
        partitions_def=partitions,
        pool=pool_name(project.source),
        code_version=table.fingerprint(project.bronze),
        kinds={"postgres", "csv"},
        metadata=static_metadata,
        description=f"Daily extract of PostgreSQL table {qname} by {table.column} "
        f"({table.timezone} days) into Bronze.",
    )
    def _daily(
        context: AssetExecutionContext, postgres: PostgresResource, bronze: BronzeResource
    ) -> MaterializeResult:
        partition_key = context.partition_key
        day = dt.date.fromisoformat(partition_key)
        where = f"table {qname}, partition {partition_key}"
        if day < resolved.start:
            raise Failure(f"{where}: before the first day {resolved.start} of this table")
        codec, level = bronze.get_codec(), bronze.get_level()
        try:
            sink = bronze.get_sink()
        except Exception as e:  # bad root, missing secret, refused credential
            raise Failure(f"{where}: Bronze at {bronze.root} is not usable: {e}") from e
        try:
            with postgres.connection() as conn:
                result = extract_day(
                    conn,
                    source=project.source,
                    table=qname,
                    column=table.column,
                    day=day,
                    timezone=table.timezone,
                    sink=sink,
                    codec=codec,
                    level=level,
                    run_id=context.run_id,
                    block_size=bronze.block_size,
                    lock_timeout_s=project.postgres.lock_timeout_s,
                    content_hash=project.checks_for(table).content_hash,
                )
        except CatalogError as e:
            raise Failure(f"{where}: {e} (config key {e.key!r})") from None
        except Exception as e:
            raise _failure_or_retry(context, e, where, retries, postgres) from e
        info, plan = result.info, result.plan
        context.log.info(f"{where}: {plan.strategy} on {plan.relation}")
        s = result.stats
        return MaterializeResult(
            metadata={
                "dagster/partition_row_count": s.rows,
                "dagster/uri": result.published.uri,
                "dagster/column_schema": column_schema(info.columns),
                "rows": s.rows,
                "raw_bytes": MetadataValue.int(s.raw_bytes),
                "compressed_bytes": MetadataValue.int(s.compressed_bytes),
                "compression_ratio": MetadataValue.float(round(s.ratio, 2)),
                "seconds": MetadataValue.float(round(s.seconds, 3)),
                "mb_per_s": MetadataValue.float(round(s.mb_per_s, 1)),
                "uri": MetadataValue.path(result.published.uri),
                "source_relation": str(plan.relation),
                "strategy": plan.strategy,
                "snapshot": MetadataValue.json(result.snapshot),
                "sha256": s.sha256,
                "codec": f"{codec.name}:{level}",
            }
        )

    return _daily

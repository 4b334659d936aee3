"""One asset (and one sensor) per incremental table.

Each materialization publishes the table's next batch (`pg_assets.core.incremental`): the
first one a full snapshot, then the rows whose cursor moved above the watermark held in the
lake. When nothing can be taken yet (no new rows, or an open transaction holds the watermark)
the run succeeds without a materialization and its log says why. The sensor
(`pg_assets.sensors.incremental`) requests runs; a materialization from the UI works the same.
"""

from collections.abc import Iterator

import psycopg
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    SensorDefinition,
    asset,
)

from pg_assets.assets.daily import _failure_or_retry, column_schema, pool_name, safe_name
from pg_assets.config import ConfigError, ProjectConfig, TableConfig
from pg_assets.core.incremental import (
    BatchResult,
    IncrementalSpec,
    NoBatch,
    describe_incremental,
    extract_batch,
    read_cap,
)
from pg_assets.core.planner import CatalogError
from pg_assets.core.session import connect_kwargs, read_conninfo
from pg_assets.resources.bronze import BronzeResource
from pg_assets.resources.postgres import PostgresResource
from pg_assets.sensors.incremental import BATCH_HINT_TAG, build_incremental_sensor


def incremental_spec(project: ProjectConfig, table: TableConfig) -> IncrementalSpec:
    return IncrementalSpec(
        source=project.source,
        table=table.name,
        cursor=table.cursor_column,
        key=tuple(table.key_columns),
        lookback=table.lookback,
        batch_max_rows=table.batch_max_rows,
        timezone=table.timezone,
    )


def incremental_key(project: ProjectConfig, table: TableConfig) -> AssetKey:
    name = table.name
    return AssetKey([project.source, safe_name(name.schema), safe_name(name.name)])


def _metadata(result: BatchResult) -> dict[str, object]:
    s, m, b = result.stats, result.manifest, result.bounds
    meta: dict[str, object] = {
        "dagster/row_count": s.rows,
        "dagster/uri": result.published.uri,
        "dagster/column_schema": column_schema(result.info.columns),
        "batch": result.batch,
        "rows": s.rows,
        "watermark_low": MetadataValue.text(b.low or "(none)"),
        "watermark_high": MetadataValue.text(b.high or "(none)"),
        "newest_seen": MetadataValue.text(b.newest_seen or "(none)"),
        "raw_bytes": MetadataValue.int(s.raw_bytes),
        "compressed_bytes": MetadataValue.int(s.compressed_bytes),
        "seconds": MetadataValue.float(round(s.seconds, 3)),
        "mb_per_s": MetadataValue.float(round(s.mb_per_s, 1)),
        "uri": MetadataValue.path(result.published.uri),
        "filter": m["filter"],
        "cap": MetadataValue.text(result.cap.reason),
        "snapshot": MetadataValue.json(m["snapshot"]),
        "sha256": s.sha256,
    }
    if m["lag_seconds"] is not None:
        meta["lag_seconds"] = MetadataValue.float(m["lag_seconds"])
    if b.limited_by:
        meta["limited_by"] = b.limited_by
    return meta


def build_incremental_asset(project: ProjectConfig, table: TableConfig) -> AssetsDefinition:
    spec = incremental_spec(project, table)
    qname = table.name
    retries = project.postgres.retries
    static_metadata: dict[str, object] = {
        "table": MetadataValue.text(str(qname)),
        "cursor": MetadataValue.text(spec.cursor),
        "key": MetadataValue.text(", ".join(spec.key)),
        "lookback": MetadataValue.text(str(spec.lookback) if spec.lookback else "(none)"),
        "config_file": MetadataValue.path(str(project.path)),
    }

    @asset(
        key=incremental_key(project, table),
        group_name=project.source,
        pool=pool_name(project.source),
        code_version=table.fingerprint(project.bronze),
        kinds={"postgres", "csv"},
        metadata=static_metadata,
        output_required=False,
        description=f"Incremental extract of PostgreSQL table {qname} by {spec.cursor} into "
        "Bronze: batch 0 is a full snapshot, then each batch holds the rows whose cursor moved "
        "above the watermark.",
    )
    def _incremental(
        context: AssetExecutionContext, postgres: PostgresResource, bronze: BronzeResource
    ) -> Iterator[MaterializeResult]:
        where = f"table {qname}, incremental batch"
        codec, level = bronze.get_codec(), bronze.get_level()
        try:
            sink = bronze.get_sink()
        except Exception as e:  # bad root, missing secret, refused credential
            raise Failure(f"{where}: Bronze at {bronze.root} is not usable: {e}") from e
        bronze.sweep_staging_once(context, sink)
        hint = context.run.tags.get(BATCH_HINT_TAG)
        try:
            with postgres.connection() as conn:
                result = extract_batch(
                    conn,
                    spec=spec,
                    sink=sink,
                    codec=codec,
                    level=level,
                    run_id=context.run.run_id,
                    block_size=bronze.block_size,
                    lock_timeout_s=project.postgres.lock_timeout_s,
                    batch_hint=int(hint) if hint and hint.isdigit() else None,
                )
        except CatalogError as e:
            raise Failure(f"{where}: {e} (config key {e.key!r})") from None
        except Exception as e:
            raise _failure_or_retry(context, e, where, retries, postgres) from e
        for warning in result.warnings:
            context.log.warning(warning)
        if isinstance(result, NoBatch):
            context.log.info(f"table {qname}: no batch {result.batch} published: {result.reason}")
            return
        if not result.cap.applied:
            context.log.warning(f"{where} {result.batch}: {result.cap.reason}")
        b = result.bounds
        context.log.info(
            f"table {qname}: batch {result.batch} ({result.manifest['filter']}, low {b.low}, "
            f"high {b.high}): {result.stats.rows} rows; cap: {result.cap.reason}"
        )
        yield MaterializeResult(metadata=_metadata(result))

    return _incremental


def build_incremental(
    config: ProjectConfig,
) -> tuple[list[AssetsDefinition], list[SensorDefinition]]:
    """Assets and sensors of the config's incremental tables. Opens no connection: the
    catalog checks run in `pg-assets check` and in every materialization."""
    assets, sensors = [], []
    for table in config.tables_of("incremental"):
        a = build_incremental_asset(config, table)
        assets.append(a)
        sensors.append(
            build_incremental_sensor(
                incremental_spec(config, table), a.key, a.op.name, table.poll_interval_s
            )
        )
    return assets, sensors


def check_incremental(config: ProjectConfig) -> list[str]:
    """`pg-assets check` for incremental tables: one line per table, then its warnings.

    Raises ConfigError (file, table, key) for what would fail every run."""
    tables = config.tables_of("incremental")
    if not tables:
        return []
    pg = config.postgres
    lines = []
    try:
        conninfo = read_conninfo(pg.conninfo_env)
        kwargs = connect_kwargs(
            min(pg.connect_timeout_s, 5), 0, conninfo, lock_timeout_s=pg.lock_timeout_s
        )
        conn = psycopg.connect(conninfo, **kwargs, autocommit=True)  # type: ignore[arg-type]
    except (psycopg.OperationalError, RuntimeError) as e:
        return [f"{t.table}: incremental, NOT CHECKED (database unreachable: {e})" for t in tables]
    with conn:
        for t in tables:
            spec = incremental_spec(config, t)
            try:
                info = describe_incremental(conn, spec)
            except CatalogError as e:
                raise ConfigError(f"{config.table_context(t)}: key {e.key!r}: {e}") from None
            cap = read_cap(conn, info.kind)
            if not cap.applied and info.kind != "integer" and not spec.lookback:
                raise ConfigError(
                    f"{config.table_context(t)}: key 'lookback': required here, because the "
                    f"watermark cannot be capped below open transactions: {cap.reason}"
                )
            lines.append(
                f"{t.table}: incremental on {info.cursor.name} ({info.cursor.type}), key "
                f"{', '.join(info.key)}, checked"
            )
            lines += [f"  warning: {w}" for w in info.warnings()]
            if not cap.applied:
                lines.append(f"  warning: {cap.reason}")
    return lines

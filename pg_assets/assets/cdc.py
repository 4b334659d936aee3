"""CDC tables in Dagster: one multi-asset per source, one asset per table, one job, a check.

Asset keys are `[source, schema, table, "cdc"]` (characters Dagster does not allow become `_`,
as for daily assets): the trailing "cdc" says what the asset's files are (a snapshot and change
files, not days), so switching a table between modes never mixes two histories in one asset.

A run of the source's job (`<source>__cdc`) materializes every table at once from the source's
one slot (`pg_assets.core.cdc.run.sync`): each table whose changes landed (or whose snapshot
was taken) gets a materialization with its metadata; a table without changes in the run is
skipped, not given an empty materialization. Each asset carries the `slot_health` check,
evaluated at the end of every run (and before a failure is raised): WARN above
`cdc.max_lag_mb` of retained WAL, ERROR when the slot is missing, lost or about to be.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSelection,
    Failure,
    MaterializeResult,
    MetadataValue,
    SensorDefinition,
    TableColumn,
    TableSchema,
    define_asset_job,
    multi_asset,
)
from dagster import AssetSpec as _AssetSpec
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)

from pg_assets.assets.daily import _failure_or_retry, pool_name
from pg_assets.config import ConfigError, ProjectConfig, TableConfig
from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.batch import TableChanges
from pg_assets.core.cdc.changes import ChangeFileError, table_display
from pg_assets.core.cdc.lsn import format_lsn
from pg_assets.core.cdc.pgoutput import commit_datetime
from pg_assets.core.cdc.reader import CdcError
from pg_assets.core.cdc.run import CdcConfigError, CdcSource, SyncResult, assess, sync
from pg_assets.core.cdc.snapshot import TableSnapshot
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.session import read_conninfo
from pg_assets.resources.bronze import BronzeResource
from pg_assets.resources.postgres import PostgresResource

CHECK_NAME = "slot_health"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def cdc_asset_key(source: str, table: QualifiedName) -> AssetKey:
    return AssetKey([source, _safe(table.schema), _safe(table.name), "cdc"])


def job_name(source: str) -> str:
    return f"{source}__cdc"


def cdc_source(
    project: ProjectConfig, postgres: PostgresResource, bronze: BronzeResource
) -> CdcSource:
    """The core's view of the source, from the config file and the run's resources."""
    return CdcSource(
        source=project.source,
        slot=project.slot_name,
        publication=project.publication_name,
        tables=tuple(t.name for t in project.tables_of("cdc")),
        conninfo=read_conninfo(postgres.conninfo_env),
        sink=bronze.get_sink(),
        codec=bronze.get_codec(),
        level=bronze.get_level(),
        block_size=bronze.block_size,
        batch_max_changes=project.cdc.batch_max_changes,
        connect_timeout_s=postgres.connect_timeout_s,
        statement_timeout_s=postgres.statement_timeout_s,
        lock_timeout_s=project.postgres.lock_timeout_s,
    )


def _lsn(lsn: int | None) -> str:
    return "" if lsn is None else format_lsn(lsn)


def _time(pg_us: int | None) -> str:
    return "" if pg_us is None else commit_datetime(pg_us).isoformat()


def table_metadata(
    result: SyncResult, table: QualifiedName, changes: TableChanges | None
) -> dict[str, object]:
    """Per table: changes by op, LSN and commit-time ranges, lag, retained WAL, files."""
    health = result.health
    md: dict[str, object] = {
        "table": table_display(table.schema, table.name),
        "slot": result.slot,
        "slot_position": _lsn(result.end_lsn),
        "retained_wal_bytes": MetadataValue.int(health.retained_bytes or 0 if health else 0),
        "batches": MetadataValue.int(len(result.batches)),
    }
    snap: TableSnapshot | None = next((s for s in result.snapshots if s.ref.table == table), None)
    if snap is not None:
        md |= {
            "snapshot_lsn": format_lsn(snap.ref.lsn),
            "snapshot_rows": MetadataValue.int(snap.stats.rows),
            "snapshot_uri": MetadataValue.path(snap.uri),
            "dagster/column_schema": TableSchema(
                columns=[TableColumn(c["name"], c["type"]) for c in snap.manifest["columns"]]
            ),
        }
    if changes is not None:
        ops = changes.ops
        md |= {
            "changes": MetadataValue.int(changes.rows),
            "inserts": MetadataValue.int(ops.get("I", 0)),
            "updates": MetadataValue.int(ops.get("U", 0)),
            "deletes": MetadataValue.int(ops.get("D", 0)),
            "truncates": MetadataValue.int(ops.get("T", 0)),
            "first_commit_lsn": _lsn(changes.first_commit_lsn),
            "last_commit_lsn": _lsn(changes.last_commit_lsn),
            "first_commit_time": _time(changes.first_commit_time),
            "last_commit_time": _time(changes.last_commit_time),
            "lag_seconds": MetadataValue.float(round(result.lag_seconds.get(table, 0.0), 3)),
            "files": MetadataValue.json(changes.uris),
            "raw_bytes": MetadataValue.int(changes.raw_bytes),
            "compressed_bytes": MetadataValue.int(changes.compressed_bytes),
        }
        if changes.uris:
            md["dagster/uri"] = changes.uris[-1]
        if changes.columns and snap is None:
            md["dagster/column_schema"] = TableSchema(
                columns=[TableColumn(c["name"], c["type"]) for c in changes.columns]
            )
    return md


def check_results(
    keys: list[AssetKey], health: cdc_slot.SlotHealth | None, slot: str, max_lag_bytes: int
) -> Iterator[AssetCheckResult]:
    verdict = assess(health, slot, max_lag_bytes)
    md: dict[str, object] = {"slot": slot}
    if health is not None:
        md |= {
            "wal_status": health.wal_status or "",
            "retained_wal_bytes": MetadataValue.int(health.retained_bytes or 0),
            "lag_bytes": MetadataValue.int(health.lag_bytes or 0),
            "confirmed_flush_lsn": _lsn(health.confirmed_flush_lsn),
            "safe_wal_size": MetadataValue.int(health.safe_wal_size or 0)
            if health.safe_wal_size is not None
            else "unlimited (max_slot_wal_keep_size = -1)",
            "max_lag_bytes": MetadataValue.int(max_lag_bytes),
        }
    severity = AssetCheckSeverity.ERROR if verdict.level == "error" else AssetCheckSeverity.WARN
    for key in keys:
        yield AssetCheckResult(
            asset_key=key,
            check_name=CHECK_NAME,
            passed=verdict.level == "ok",
            severity=severity,
            description=verdict.message,
            metadata=md,
        )


def _health_now(src: CdcSource) -> cdc_slot.SlotHealth | None | Exception:
    try:
        with src.connect(autocommit=True) as conn:
            return cdc_slot.slot_health(conn, src.slot)
    except Exception as e:  # the database is down: no verdict rather than a wrong one
        return e


@dataclass(frozen=True)
class CdcDefinitions:
    assets: list[AssetsDefinition]
    jobs: list[UnresolvedAssetJobDefinition]
    sensors: list[SensorDefinition]
    keys: list[AssetKey]


def build_cdc(project: ProjectConfig) -> CdcDefinitions:
    """The source's CDC multi-asset, job and sensor (all empty without `mode: cdc` tables)."""
    from pg_assets.sensors.cdc import build_cdc_sensor

    built = build_cdc_assets(project)
    if built is None:
        return CdcDefinitions([], [], [], [])
    sensor = build_cdc_sensor(project, built.jobs[0].name, built.keys)
    return CdcDefinitions(built.assets, built.jobs, [sensor], built.keys)


def _spec(project: ProjectConfig, table: TableConfig) -> _AssetSpec:
    name = table.name
    return _AssetSpec(
        cdc_asset_key(project.source, name),
        group_name=project.source,
        skippable=True,
        kinds={"postgres", "csv"},
        description=f"Changes of PostgreSQL table {table_display(name.schema, name.name)} "
        f"from replication slot {project.slot_name!r} (publication "
        f"{project.publication_name!r}): a snapshot, then change files per batch.",
        metadata={
            "table": table_display(name.schema, name.name),
            "mode": "cdc",
            "slot": project.slot_name,
            "publication": project.publication_name,
            "config_file": MetadataValue.path(str(project.path)),
        },
    )


def build_cdc_assets(project: ProjectConfig) -> CdcDefinitions | None:
    """The source's CDC multi-asset and its job; None when no table is in mode `cdc`."""
    tables = project.tables_of("cdc")
    if not tables:
        return None
    specs = [_spec(project, t) for t in tables]
    keys = [s.key for s in specs]
    seen: dict[AssetKey, str] = {}
    for spec, t in zip(specs, tables, strict=True):
        if spec.key in seen:
            raise ConfigError(
                f"{project.table_context(t)}: key 'table': maps to the same asset key "
                f"{spec.key.to_user_string()} as {seen[spec.key]!r}"
            )
        seen[spec.key] = t.table
    names = {s.key: t.name for s, t in zip(specs, tables, strict=True)}
    max_lag_bytes = int(project.cdc.max_lag_mb * (1 << 20))
    retries = project.postgres.retries
    slot = project.slot_name

    @multi_asset(
        name=f"{project.source}__cdc_batch",
        specs=specs,
        check_specs=[
            AssetCheckSpec(
                CHECK_NAME,
                asset=k,
                description=f"Replication slot {slot!r}: WARN above cdc.max_lag_mb of retained "
                "WAL, ERROR when it is missing, lost or about to be",
            )
            for k in keys
        ],
        can_subset=False,
        pool=pool_name(project.source),
    )
    def _cdc(
        context: AssetExecutionContext, postgres: PostgresResource, bronze: BronzeResource
    ) -> Iterator[MaterializeResult | AssetCheckResult]:
        where = f"CDC of source {project.source!r} (slot {slot!r})"
        try:
            src = cdc_source(project, postgres, bronze)
        except Exception as e:  # a missing conninfo variable, an unusable Bronze root
            raise Failure(f"{where}: {e}") from None
        bronze.sweep_staging_once(context, src.sink)
        try:
            result = sync(src, context.run.run_id, log=context.log.info)
        except Exception as e:
            health = _health_now(src)
            if not isinstance(health, Exception):
                yield from check_results(keys, health, slot, max_lag_bytes)
            if isinstance(e, CdcConfigError):
                raise Failure(f"{where}: the database is not ready:\n" + str(e)) from None
            if isinstance(e, CdcError | ChangeFileError) and not isinstance(e.__cause__, Exception):
                raise Failure(f"{where}: {e}") from None
            raise _failure_or_retry(context, e, where, retries, postgres) from e
        for key in keys:
            table = names[key]
            changes = result.tables.get(table)
            snapshot = any(s.ref.table == table for s in result.snapshots)
            if changes is None and not snapshot:
                continue  # skipped: nothing of this table landed in this run
            yield MaterializeResult(asset_key=key, metadata=table_metadata(result, table, changes))
        yield from check_results(keys, result.health, slot, max_lag_bytes)

    job = define_asset_job(
        job_name(project.source),
        selection=AssetSelection.assets(*keys),
        description=f"CDC of source {project.source!r}: one batch run of slot {slot!r}",
    )
    return CdcDefinitions([_cdc], [job], [], keys)

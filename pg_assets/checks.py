"""Asset checks that prove each day in Bronze still matches PostgreSQL, and freshness.

Per table, three checks per day (partitioned checks: each result belongs to its day in the UI;
`AssetCheckSpec(partitions_def=...)` is a preview feature of Dagster 1.13, and its storage,
GraphQL and UI show check status per partition):

    bronze_readable    the day's file, read back from the sink, has the manifest's sha256 and
                       row count (streamed; optional byte budget); warns naming any other
                       file in the day folder (a killed run's leftover)
    matches_source     PostgreSQL's count(*) of the day (the current plan's relation and
                       bounds) equals the manifest's rows; optionally the content hash too
    schema_unchanged   the day's columns and types equal the previous day's (WARN on drift)

The checks run in their own step (`build_day_checks`), over one day or a range of days, so a
user can re-check any days without re-extracting them, and a run that materializes days runs
them afterwards. Each result is an `AssetCheckEvaluation` for one day (`partition=day`), which
is how a ranged run reports per-day results (an `AssetCheckResult` would take the run's
single partition key). `day_check_evaluations` is the same logic for any caller: an asset
that yields no output (ranged runs with `output_required=False`) makes Dagster skip the check
step, and must then yield these evaluations itself after each day.

Freshness: `build_time_partition_freshness_checks` (yesterday's partition must exist by the
deadline, in the table's time zone) with Dagster's freshness sensor.
"""

import datetime as dt
import warnings
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    DagsterInstance,
    Failure,
    MetadataValue,
    Output,
    SensorDefinition,
    build_sensor_for_freshness_checks,
    build_time_partition_freshness_checks,
    multi_asset_check,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from pg_assets.catalog import ResolvedTable
from pg_assets.config import ChecksConfig, ProjectConfig, TableConfig
from pg_assets.core.extract import lock_key
from pg_assets.core.layout import daily_paths
from pg_assets.core.planner import CatalogError, TableInfo, describe_table, plan_day
from pg_assets.core.publish import held_by, read_manifest
from pg_assets.core.verify import Leftovers, count_day, find_leftovers, read_back, schema_diff
from pg_assets.resources.bronze import BronzeResource
from pg_assets.resources.postgres import PostgresResource
from pg_assets.sinks.base import Sink

BRONZE_READABLE = "bronze_readable"
MATCHES_SOURCE = "matches_source"
SCHEMA_UNCHANGED = "schema_unchanged"
CHECK_NAMES = (BRONZE_READABLE, MATCHES_SOURCE, SCHEMA_UNCHANGED)

_DESCRIPTIONS = {
    BRONZE_READABLE: "The day's published file, read back from Bronze (local or ADLS) and "
    "decompressed as a stream, has the sha256 and the number of CSV records its manifest "
    "recorded. Fails naming the file and what is wrong (missing, truncated, corrupt). Warns "
    "naming any other file in the day folder (left by a run killed while publishing): glob "
    "readers would read its rows too. To clean up, re-materialize the day (its publish removes "
    "every older data file of the day) or delete the files named.",
    MATCHES_SOURCE: "PostgreSQL still holds as many rows for the day (count(*) on the relation "
    "and bounds the extraction reads) as Bronze does, and, with checks.content_hash, the same "
    "rows (an order-independent hash of every row). Fails with both counts: late or changed "
    "data re-opened the day. The late-data sensor records failures of this check too.",
    SCHEMA_UNCHANGED: "The day's columns and types equal the previous day's manifest. Warns "
    "naming the added, dropped and retyped columns.",
}


def check_specs(asset_def: AssetsDefinition) -> list[AssetCheckSpec]:
    """One partitioned spec per check: results are stored and shown per day."""
    with warnings.catch_warnings():  # partitions_def on a check is a preview feature in 1.13
        warnings.simplefilter("ignore")
        return [
            AssetCheckSpec(
                name,
                asset=asset_def.key,
                description=_DESCRIPTIONS[name] + " Evaluated per day (partition).",
                partitions_def=asset_def.partitions_def,
            )
            for name in CHECK_NAMES
        ]


@dataclass(frozen=True)
class DayChecks:
    """What checking a day of one table needs besides the resources."""

    source: str
    table: TableConfig
    config: ChecksConfig
    asset_key: AssetKey

    @property
    def byte_budget(self) -> int | None:
        mib = self.config.read_back_budget_mib
        return None if mib is None else int(mib * 1024 * 1024)

    def where(self, day: dt.date) -> str:
        return f"table {self.table.name}, partition {day.isoformat()}"


def day_checks_for(project: ProjectConfig, table: TableConfig, asset_key: AssetKey) -> DayChecks:
    return DayChecks(project.source, table, project.checks_for(table), asset_key)


def _target(
    instance: DagsterInstance | None, key: AssetKey, day: str
) -> AssetCheckEvaluationTargetMaterializationData | None:
    """The day's latest materialization: the UI ties the result to it."""
    if instance is None:
        return None
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[day]), limit=1
    ).records
    if not records:
        return None
    r = records[0]
    return AssetCheckEvaluationTargetMaterializationData(
        storage_id=r.storage_id, run_id=r.run_id, timestamp=r.timestamp
    )


def evaluation(
    checks: DayChecks,
    name: str,
    day: str,
    passed: bool,
    description: str,
    metadata: dict[str, Any],
    *,
    instance: DagsterInstance | None,
    severity: AssetCheckSeverity = AssetCheckSeverity.ERROR,
) -> AssetCheckEvaluation:
    return AssetCheckEvaluation(
        asset_key=checks.asset_key,
        check_name=name,
        passed=passed,
        metadata={"partition": MetadataValue.text(day), **metadata},
        severity=severity,
        description=description,
        partition=day,
        target_materialization_data=_target(instance, checks.asset_key, day),
        blocking=False,
    )


def _day_lock_holder(postgres: PostgresResource, checks: DayChecks, day: dt.date) -> str | None:
    with postgres.connection() as conn:
        return held_by(conn, lock_key(checks.source, checks.table.name, day))


def _leftovers(
    checks: DayChecks, sink: Sink, day: dt.date, manifest: dict[str, Any], postgres: Any
) -> tuple[Leftovers, str]:
    """The day folder's other files, and a note when PostgreSQL could not say whether a run
    of the day is in progress (they are reported all the same)."""
    note: list[str] = []

    def holder() -> str | None:
        try:
            return _day_lock_holder(postgres, checks, day)
        except Exception as e:
            note.append(f"could not ask PostgreSQL whether a run of the day is in progress: {e}")
            return None

    paths = daily_paths(checks.source, checks.table.name, day)
    found = find_leftovers(sink, paths, manifest, holder)
    return found, "".join(note)


def _leftover_text(found: Leftovers, sink: Sink, note: str) -> str:
    if found.in_progress is not None:
        return (
            f"; {len(found.files)} other file(s) in the day folder not checked: "
            f"{found.in_progress} is publishing this day"
        )
    if not found.files:
        return ""
    names = ", ".join(sink.uri(f) for f in found.files)
    foreign = len(found.files) - len(found.data_files)
    text = (
        f"; but the day folder also holds {len(found.files)} file(s) its manifest does not "
        f"name, left by a run that was killed while publishing: {names}. Glob readers "
        "(date=*/*.csv.gz) would read their rows too. Re-materialize the day to remove them "
        "(its publish removes every older data file of the day)"
    )
    if foreign:
        text += f"; {foreign} of them are not pg_assets data files: delete those by hand"
    return text + (f" ({note})" if note else "")


def _bronze_readable(
    checks: DayChecks,
    sink: Sink,
    folder: str,
    day: str,
    manifest: dict[str, Any],
    instance: Any,
    postgres: Any,
) -> AssetCheckEvaluation:
    r = read_back(sink, folder, manifest, byte_budget=checks.byte_budget)
    found, note = _leftovers(checks, sink, dt.date.fromisoformat(day), manifest, postgres)
    meta: dict[str, Any] = {
        "file": MetadataValue.path(sink.uri(r.file)),
        "part_checked": MetadataValue.text(r.part_checked()),
        "complete": MetadataValue.bool(r.complete),
        "bytes_read": MetadataValue.int(r.bytes_read),
        "manifest_bytes": MetadataValue.int(r.expected_bytes),
        "manifest_rows": MetadataValue.int(r.expected_rows),
        "seconds": MetadataValue.float(round(r.seconds, 3)),
        "mb_per_s": MetadataValue.float(round(r.mb_per_s, 1)),
    }
    if r.size_in_store is not None:
        meta["bytes_in_store"] = MetadataValue.int(r.size_in_store)
    if r.rows is not None:
        meta["rows_read_back"] = MetadataValue.int(r.rows)
    if r.problems:
        meta["problems"] = MetadataValue.json(r.problems)
    if found.files:
        meta["other_files"] = MetadataValue.json([sink.uri(f) for f in found.files])
    if found.in_progress is not None:
        meta["publishing_now"] = MetadataValue.text(found.in_progress)
    # A leftover warns: the day's committed file is intact and every reader that goes through
    # the manifest reads it right; only glob readers are misled. A bad file fails (ERROR).
    severity = AssetCheckSeverity.WARN if r.ok and found.flagged else AssetCheckSeverity.ERROR
    text = r.summary() + _leftover_text(found, sink, note)
    return evaluation(checks, BRONZE_READABLE, day, r.ok and not found.flagged, text, meta,
                      instance=instance, severity=severity)  # fmt: skip


def _matches_source(
    checks: DayChecks,
    conn: Any,
    info: TableInfo,
    day: dt.date,
    manifest: dict[str, Any],
    instance: Any,
) -> AssetCheckEvaluation:
    table = checks.table
    plan = plan_day(info, day, table.timezone)
    recorded = manifest.get("content_hash") if checks.config.content_hash else None
    names = [c["name"] for c in manifest.get("columns", [])]
    current = {c.name for c in info.columns}
    note = ""
    hash_columns = None
    if checks.config.content_hash:
        if not isinstance(recorded, dict):
            note = "; content hash not compared: none recorded at extraction (re-materialize)"
        elif not set(names) <= current:
            gone = ", ".join(n for n in names if n not in current)
            note = f"; content hash not compared: column(s) {gone} no longer exist"
        else:
            hash_columns = names
    with conn.transaction():
        got = count_day(conn, plan, info.partition_column.name, hash_columns)
    bronze_rows = int(manifest["rows"])
    rows_ok = got.rows == bronze_rows
    hash_ok = hash_columns is None or got.content_hash == str(recorded["value"])  # type: ignore[index]
    meta: dict[str, Any] = {
        "bronze_rows": MetadataValue.int(bronze_rows),
        "source_rows": MetadataValue.int(got.rows),
        "difference": MetadataValue.int(got.rows - bronze_rows),
        "source_relation": MetadataValue.text(str(plan.relation)),
        "strategy": MetadataValue.text(plan.strategy),
        "extracted_at": MetadataValue.text(str(manifest.get("extracted_at"))),
        "content_hash_compared": MetadataValue.bool(hash_columns is not None),
    }
    if hash_columns is not None:
        meta["bronze_content_hash"] = MetadataValue.text(str(recorded["value"]))  # type: ignore[index]
        meta["source_content_hash"] = MetadataValue.text(str(got.content_hash))
    where = f"{checks.where(day)} ({plan.relation})"
    if rows_ok and hash_ok:
        what = "rows and content hash" if hash_columns is not None else "rows"
        text = f"{where}: PostgreSQL and Bronze agree: {got.rows:,} {what}{note}"
    elif not rows_ok:
        text = (
            f"{where}: PostgreSQL now has {got.rows:,} rows, Bronze has {bronze_rows:,} "
            f"(extracted {manifest.get('extracted_at')}); the day changed since it was "
            f"extracted{note}"
        )
    else:
        text = (
            f"{where}: same {got.rows:,} rows but different content: rows were updated since "
            f"the extraction at {manifest.get('extracted_at')}"
        )
    return evaluation(checks, MATCHES_SOURCE, day.isoformat(), rows_ok and hash_ok, text, meta,
                      instance=instance)  # fmt: skip


def _schema_unchanged(
    checks: DayChecks, sink: Sink, day: dt.date, manifest: dict[str, Any], instance: Any
) -> AssetCheckEvaluation:
    prev_day = day - dt.timedelta(days=1)
    previous = read_manifest(sink, daily_paths(checks.source, checks.table.name, prev_day).manifest)
    where = checks.where(day)
    if previous is None:
        return evaluation(
            checks, SCHEMA_UNCHANGED, day.isoformat(), True,
            f"{where}: no manifest for the previous day {prev_day} to compare with",
            {"compared_with": MetadataValue.text("nothing")}, instance=instance,
            severity=AssetCheckSeverity.WARN,
        )  # fmt: skip
    diff = schema_diff(previous.get("columns", []), manifest.get("columns", []))
    meta = {
        "compared_with": MetadataValue.text(prev_day.isoformat()),
        "added": MetadataValue.json([{"name": n, "type": t} for n, t in diff.added]),
        "dropped": MetadataValue.json([{"name": n, "type": t} for n, t in diff.dropped]),
        "retyped": MetadataValue.json(
            [{"name": n, "before": a, "after": b} for n, a, b in diff.retyped]
        ),
    }
    text = (
        f"{where}: columns changed since {prev_day}: {diff.describe()}"
        if diff.changed
        else f"{where}: same {len(manifest.get('columns', []))} columns and types as {prev_day}"
    )
    return evaluation(checks, SCHEMA_UNCHANGED, day.isoformat(), not diff.changed, text, meta,
                      instance=instance, severity=AssetCheckSeverity.WARN)  # fmt: skip


def day_check_evaluations(
    checks: DayChecks,
    days: Iterable[dt.date],
    *,
    sink: Sink,
    postgres: PostgresResource,
    instance: DagsterInstance | None,
    selected: Collection[str] = CHECK_NAMES,
    info: TableInfo | None = None,
    keep_going: bool = False,
) -> Iterator[AssetCheckEvaluation]:
    """The selected checks of each day, one evaluation per check and day, in day order.

    A check that finds Bronze or PostgreSQL different fails its evaluation. A check that
    cannot run (PostgreSQL or the store unreachable) raises `Failure` naming the table and
    day, after the evaluations before it were yielded; with `keep_going` (the extraction
    asset, whose day is already published) it fails its own evaluation saying why instead,
    and the other checks still run.
    """

    def cannot_run(name: str, day: dt.date, error: Exception) -> Iterator[AssetCheckEvaluation]:
        if not keep_going:
            raise error
        yield evaluation(
            checks, name, day.isoformat(), False, f"could not run: {error}", {},
            instance=instance,
        )  # fmt: skip

    for day in days:
        key = day.isoformat()
        where = checks.where(day)
        paths = daily_paths(checks.source, checks.table.name, day)
        try:
            manifest = read_manifest(sink, paths.manifest)
        except Exception as e:
            error = Failure(f"{where}: reading the manifest {paths.manifest} failed: {e}")
            for name in selected:
                yield from cannot_run(name, day, error)
            continue
        if manifest is None:
            for name in selected:
                yield evaluation(
                    checks, name, key, False,
                    f"{where}: no manifest at {sink.uri(paths.manifest)}; the day is not in Bronze",
                    {}, instance=instance,
                )  # fmt: skip
            continue
        if BRONZE_READABLE in selected:
            try:
                yield _bronze_readable(
                    checks, sink, paths.folder, key, manifest, instance, postgres
                )
            except Exception as e:  # the store itself failed us, not the file
                failure = Failure(f"{where}: reading {manifest.get('file')} back failed: {e}")
                yield from cannot_run(BRONZE_READABLE, day, failure)
        if MATCHES_SOURCE in selected:
            try:
                with postgres.connection() as conn:
                    if info is None:
                        with conn.transaction():
                            info = describe_table(conn, checks.table.name, checks.table.column)
                    yield _matches_source(checks, conn, info, day, manifest, instance)
            except CatalogError as e:
                yield from cannot_run(
                    MATCHES_SOURCE, day, Failure(f"{where}: {e} (config key {e.key!r})")
                )
            except Failure as e:
                yield from cannot_run(MATCHES_SOURCE, day, e)
            except Exception as e:
                failure = Failure(f"{where}: counting the day in PostgreSQL failed: {e}")
                yield from cannot_run(MATCHES_SOURCE, day, failure)
        if SCHEMA_UNCHANGED in selected:
            yield _schema_unchanged(checks, sink, day, manifest, instance)


def build_day_checks(project: ProjectConfig, asset_def: AssetsDefinition, table: TableConfig):
    """The three checks of one table's asset, runnable over any day or range of days."""
    checks = day_checks_for(project, table, asset_def.key)
    specs = check_specs(asset_def)
    output_names = {s.name: s.get_python_identifier() for s in specs}

    @multi_asset_check(
        name=f"{asset_def.op.name}__checks",
        specs=specs,
        can_subset=True,
        pool=f"postgres_{project.source}",
        description=f"Bronze vs PostgreSQL checks of {table.name}, per day.",
    )
    def _day_checks(
        context: AssetCheckExecutionContext, postgres: PostgresResource, bronze: BronzeResource
    ) -> Iterator[Any]:
        selected = {k.name for k in context.selected_asset_check_keys}
        days = [dt.date.fromisoformat(k) for k in context.partition_keys]
        try:
            sink = bronze.get_sink()
        except Exception as e:
            raise Failure(f"table {table.name}: Bronze at {bronze.root} is not usable: {e}") from e
        failed = 0
        for ev in day_check_evaluations(
            checks, days, sink=sink, postgres=postgres, instance=context.instance,
            selected=selected,
        ):  # fmt: skip
            failed += not ev.passed
            yield ev
        context.log.info(
            f"table {table.name}: {len(selected)} check(s) on {len(days)} day(s), "
            f"{failed} not passed"
        )
        for name in sorted(selected):
            yield Output(None, output_name=output_names[name])

    return _day_checks


def freshness_cron(deadline: dt.time) -> str:
    return f"{deadline.minute} {deadline.hour} * * *"


def build_freshness(
    project: ProjectConfig, assets: Sequence[tuple[TableConfig, AssetsDefinition]]
) -> tuple[list[AssetChecksDefinition], list[SensorDefinition]]:
    """Dagster's time-partition freshness checks: by each table's deadline, in its time zone,
    the latest complete day (yesterday) must be materialized. One check definition per
    (time zone, deadline); one sensor per source evaluates them (stopped by default)."""
    groups: dict[tuple[str, dt.time], list[AssetsDefinition]] = {}
    for table, asset_def in assets:
        deadline = project.checks_for(table).freshness_deadline
        if deadline is not None:
            groups.setdefault((table.timezone, deadline), []).append(asset_def)
    if not groups:
        return [], []
    defs: list[AssetChecksDefinition] = []
    with (
        warnings.catch_warnings()
    ):  # superseded by FreshnessPolicy, which has no per-partition form
        warnings.simplefilter("ignore")
        for (tz, deadline), group in sorted(groups.items()):
            defs.extend(
                build_time_partition_freshness_checks(
                    assets=group, deadline_cron=freshness_cron(deadline), timezone=tz
                )
            )
        sensor = build_sensor_for_freshness_checks(
            freshness_checks=defs,
            minimum_interval_seconds=project.checks.sensor_interval_s,
            name=f"{project.source}__freshness",
        )
    return defs, [sensor]


def build_checks(
    project: ProjectConfig, resolved: Sequence[ResolvedTable], assets: Sequence[AssetsDefinition]
) -> tuple[list[AssetChecksDefinition], list[SensorDefinition]]:
    """Every check and check-related sensor of the source: register them in Definitions."""
    from pg_assets.sensors.late_data import build_late_data_sensor

    pairs = [(r.config, a) for r, a in zip(resolved, assets, strict=True)]
    checks: list[AssetChecksDefinition] = []
    sensors: list[SensorDefinition] = []
    for (table, asset_def), r in zip(pairs, resolved, strict=True):
        if project.checks_for(table).enabled:
            checks.append(build_day_checks(project, asset_def, table))
            sensors.append(build_late_data_sensor(project, r, asset_def))
    fresh_checks, fresh_sensors = build_freshness(project, pairs)
    return checks + fresh_checks, sensors + fresh_sensors


def check_keys(asset_key: AssetKey) -> list[AssetCheckKey]:
    return [AssetCheckKey(asset_key, n) for n in CHECK_NAMES]

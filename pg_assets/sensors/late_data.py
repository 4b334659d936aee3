"""The late-data sensor: finds closed days whose rows changed after they were extracted.

Once per interval (stopped by default; `checks.sensor_interval_s`), for one table:

1. reads the manifest of every closed day of the window (`checks.window_days` days ending
   yesterday, in the table's time zone), a few at a time;
2. re-counts all of them in PostgreSQL with one grouped query on the parent
   (`pg_assets.core.verify.recount_window`): the bounds prune to the window's partitions;
   with `checks.content_hash`, it hashes every row too, and so also sees updates that keep
   the count;
3. for each day whose count (or hash) differs from its manifest: records a failed
   `matches_source` for that day, with the count in Bronze and the count now, and, with
   `checks.late_data: rematerialize` (the default), requests runs for exactly those days:
   contiguous days batched into ranged runs of at most the asset's
   `BackfillPolicy.max_partitions_per_run` days (one day per run without a policy).

The same tick finds the files a killed run left in a day folder of the window (a second
data file beside the one the manifest names, that glob readers would read too): each day's
folder is listed instead of asking for its manifest's properties, so this costs no extra
request. A day with such files (and no run of it in progress: nobody holds its lock) gets a
failed `bronze_readable` (WARN) naming them, and with `rematerialize` a run of the day, whose
publish removes every older data file of the day. Files pg_assets never writes (a `_SUCCESS`
marker) are reported the same way but request no run, since no run would remove them. A day
is looked at again only when its folder lists other files than were reported; this part of
a tick has a time budget (`LEFTOVERS_BUDGET_S`), and what it leaves, the next tick does.

The cursor remembers which state of which day was already reported (the manifest's sha256
and the source's count and hash), so a day is reported and re-requested once per change, not
once per tick. Days without a manifest are not late data (they were never extracted) and are
left to the schedule and backfills.

Why the parent: PostgreSQL routes every row to the one partition whose bounds hold it, and
refuses a row in DEFAULT whose key belongs to another partition (and refuses to create a
partition for a day DEFAULT has rows of), so counting the parent with the day's bounds counts
exactly what the day's plan would COPY, whichever child or DEFAULT holds the rows.
"""

import datetime as dt
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetsDefinition,
    AssetSelection,
    DefaultSensorStatus,
    MetadataValue,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from psycopg import errors as pg_errors

from pg_assets.catalog import ResolvedTable
from pg_assets.checks import (
    BRONZE_READABLE,
    MATCHES_SOURCE,
    DayChecks,
    day_checks_for,
    evaluation,
)
from pg_assets.config import ProjectConfig
from pg_assets.core.extract import lock_key
from pg_assets.core.layout import PartitionPaths, daily_paths
from pg_assets.core.planner import TableInfo, describe_table
from pg_assets.core.publish import held_by
from pg_assets.core.verify import DayCount, Leftovers, find_leftovers, recount_window, unnamed
from pg_assets.resources.bronze import BronzeResource
from pg_assets.resources.postgres import PostgresResource
from pg_assets.sinks.base import Sink

# Dagster gives a sensor tick 60 s by default (DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS); the
# recount must end well before that. Hashing every row costs ~10x a count(*), so the hashed
# recount gets part of the budget and, when it runs out, the tick falls back to counting.
COUNT_TIMEOUT_S = 30
HASH_TIMEOUT_S = 15
MANIFEST_READERS = 8  # manifests read at once (ADLS: one round trip each)
MANIFEST_TIMEOUT_S = 40
LEFTOVERS_BUDGET_S = 10  # days with extra files looked at again, per tick; the rest next tick


def closed_window(
    today: dt.date, start: dt.date, window_days: int
) -> tuple[dt.date, dt.date] | None:
    """[first, last] of the window: `window_days` days ending yesterday, none before start."""
    last = today - dt.timedelta(days=1)
    first = max(start, last - dt.timedelta(days=window_days - 1))
    return (first, last) if first <= last else None


def day_ranges(days: Sequence[dt.date], max_per_run: int | None) -> list[tuple[dt.date, dt.date]]:
    """Contiguous days as [first, last] ranges of at most `max_per_run` days (None: any)."""
    out: list[tuple[dt.date, dt.date]] = []
    for day in sorted(set(days)):
        if out:
            lo, hi = out[-1]
            size = (hi - lo).days + 1
            if day == hi + dt.timedelta(days=1) and (max_per_run is None or size < max_per_run):
                out[-1] = (lo, day)
                continue
        out.append((day, day))
    return out


@dataclass(frozen=True)
class Change:
    day: dt.date
    manifest: dict[str, Any]
    source: DayCount
    hash_compared: bool

    @property
    def bronze_rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def state(self) -> str:
        """What was reported: this manifest against this source state."""
        return f"{self.manifest.get('sha256')}:{self.source.rows}:{self.source.content_hash}"


@dataclass(frozen=True)
class Folders:
    """The window's committed days: each manifest, and the other files of its folder."""

    manifests: dict[dt.date, dict[str, Any]]
    others: dict[dt.date, list[str]]  # days whose folder holds files the manifest does not name


def _read_folder(sink: Sink, paths: PartitionPaths) -> tuple[dict[str, Any] | None, list[str]]:
    """One listing of the day folder, then its manifest if the listing holds one: two
    requests for a committed day, as many as `stat` + read, and the folder's other files
    come with them."""
    files = sink.list_files(paths.folder)
    if paths.manifest not in files:
        return None, []
    try:
        manifest = json.loads(sink.read_bytes(paths.manifest))
    except (FileNotFoundError, ValueError):  # deleted meanwhile, or not a manifest
        return None, []
    if not isinstance(manifest, dict):
        return None, []
    return manifest, unnamed(files, paths.folder, manifest)


def read_folders(sink: Sink, checks: DayChecks, first: dt.date, last: dt.date) -> Folders:
    days = [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]

    def one(day: dt.date) -> tuple[dict[str, Any] | None, list[str]]:
        return _read_folder(sink, daily_paths(checks.source, checks.table.name, day))

    pool = ThreadPoolExecutor(MANIFEST_READERS, thread_name_prefix="pg_assets-manifest")
    try:
        found = list(pool.map(one, days, timeout=MANIFEST_TIMEOUT_S))
    finally:  # on a timeout, do not wait for stragglers (each is bounded by the sink's timeout)
        pool.shutdown(wait=False, cancel_futures=True)
    manifests = {d: m for d, (m, _) in zip(days, found, strict=True) if m is not None}
    others = {d: o for d, (m, o) in zip(days, found, strict=True) if m is not None and o}
    return Folders(manifests, others)


def read_manifests(
    sink: Sink, checks: DayChecks, first: dt.date, last: dt.date
) -> dict[dt.date, dict[str, Any]]:
    """The manifest of every committed day in [first, last]."""
    return read_folders(sink, checks, first, last).manifests


@dataclass(frozen=True)
class Recount:
    changes: list[Change]
    counts: dict[dt.date, DayCount]
    hashed: bool  # the content hash was compared (else counts only)
    note: str = ""


def _recount(conn: Any, info: TableInfo, timezone: str, first: dt.date, last: dt.date,
             names: list[str] | None, timeout_s: float) -> dict[dt.date, DayCount]:  # fmt: skip
    with conn.transaction():
        conn.execute(
            "SELECT set_config('statement_timeout', %s, true)", (f"{int(timeout_s * 1000)}ms",)
        )
        return recount_window(conn, info, timezone, first, last, names)


def find_changes(
    conn: Any,
    checks: DayChecks,
    manifests: dict[dt.date, dict[str, Any]],
    first: dt.date,
    last: dt.date,
    *,
    count_timeout_s: float = COUNT_TIMEOUT_S,
    hash_timeout_s: float = HASH_TIMEOUT_S,
) -> Recount:
    """Re-count [first, last] in one grouped query and compare each day with its manifest.

    With `checks.content_hash`, the query also hashes every row; if that does not finish within
    `hash_timeout_s`, the days are re-counted without the hash (and the result says so)."""
    table = checks.table
    with conn.transaction():
        info = describe_table(conn, table.name, table.column)
    names = [c.name for c in info.columns]
    hashed, note = bool(checks.config.content_hash), ""
    counts: dict[dt.date, DayCount] | None = None
    if hashed:
        try:
            counts = _recount(conn, info, table.timezone, first, last, names, hash_timeout_s)
        except pg_errors.QueryCanceled:
            hashed = False
            note = (
                f"content hash of {first}..{last} not compared: hashing every row took longer "
                f"than {hash_timeout_s:g} s (counted only; shorten checks.window_days)"
            )
    if counts is None:
        counts = _recount(conn, info, table.timezone, first, last, None, count_timeout_s)
    changes = []
    for day, manifest in sorted(manifests.items()):
        now = counts.get(day, DayCount(0, "0" if hashed else None))
        recorded = manifest.get("content_hash")
        comparable = (
            hashed
            and isinstance(recorded, dict)
            and [c["name"] for c in manifest.get("columns", [])] == names
        )
        differs = now.rows != int(manifest["rows"]) or (
            comparable and str(recorded["value"]) != now.content_hash  # type: ignore[index]
        )
        if differs:
            changes.append(Change(day, manifest, now, bool(comparable)))
    return Recount(changes, counts, hashed, note)


def _evaluation(
    checks: DayChecks, change: Change, action: str, sensor_name: str, instance: Any
) -> AssetCheckEvaluation:
    m = change.manifest
    where = checks.where(change.day)
    if change.source.rows != change.bronze_rows:
        text = (
            f"{where}: late data: PostgreSQL now has {change.source.rows:,} rows, Bronze has "
            f"{change.bronze_rows:,} (extracted {m.get('extracted_at')}); {action}"
        )
    else:
        text = (
            f"{where}: late data: same {change.source.rows:,} rows but different content "
            f"(rows updated since the extraction at {m.get('extracted_at')}); {action}"
        )
    meta: dict[str, Any] = {
        "bronze_rows": MetadataValue.int(change.bronze_rows),
        "source_rows": MetadataValue.int(change.source.rows),
        "difference": MetadataValue.int(change.source.rows - change.bronze_rows),
        "extracted_at": MetadataValue.text(str(m.get("extracted_at"))),
        "bronze_file": MetadataValue.text(str(m.get("file"))),
        "bronze_sha256": MetadataValue.text(str(m.get("sha256"))),
        "detected_by": MetadataValue.text(f"sensor {sensor_name}"),
        "action": MetadataValue.text(action),
        "content_hash_compared": MetadataValue.bool(change.hash_compared),
    }
    if change.hash_compared:
        meta["bronze_content_hash"] = MetadataValue.text(str(m["content_hash"]["value"]))
        meta["source_content_hash"] = MetadataValue.text(str(change.source.content_hash))
    return evaluation(
        checks, MATCHES_SOURCE, change.day.isoformat(), False, text, meta, instance=instance
    )


def confirm_leftovers(
    conn: Any,
    sink: Sink,
    checks: DayChecks,
    folders: Folders,
    log: Any,
    reported: Mapping[str, str],
) -> tuple[dict[dt.date, Leftovers], dict[str, str]]:
    """Of the days whose folder held other files, those where they are leftovers: no run of
    the day holds its lock, and they are there again on a second look (`find_leftovers`).
    Returns them, and the cursor state of the days already `reported` whose folder lists the
    same files again: those are not looked at again (no lock query, no second listing), so
    files nobody removes (a `_SUCCESS` marker) cost nothing after their report. Usually no
    day qualifies and this costs nothing; a failure is logged, not fatal; what the budget
    leaves is looked at next tick (days confirmed now are skipped then)."""
    found: dict[dt.date, Leftovers] = {}
    still: dict[str, str] = {}
    todo = []
    for day in sorted(folders.others):
        state = reported.get(day.isoformat())
        if state is not None and state == _files_state(folders.others[day]):
            still[day.isoformat()] = state
        else:
            todo.append(day)
    deadline = time.monotonic() + LEFTOVERS_BUDGET_S
    for i, day in enumerate(todo):
        if time.monotonic() > deadline:
            log.warning(
                f"{checks.where(day)}: {len(todo) - i} day(s) with extra files not looked at "
                f"within {LEFTOVERS_BUDGET_S} s; the next tick goes on with them"
            )
            still |= {d.isoformat(): reported[d.isoformat()] for d in todo[i:]
                      if d.isoformat() in reported}  # fmt: skip
            break
        paths = daily_paths(checks.source, checks.table.name, day)
        key = lock_key(checks.source, checks.table.name, day)
        try:
            left = find_leftovers(
                sink, paths, folders.manifests[day], lambda key=key: held_by(conn, key)
            )
        except Exception as e:
            log.warning(f"{checks.where(day)}: looking for files left by killed runs failed: {e}")
            continue
        if left.flagged:
            found[day] = left
    return found, still


def _files_state(files: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:16]


def _leftover_evaluation(
    checks: DayChecks,
    sink: Sink,
    day: dt.date,
    left: Leftovers,
    action: str,
    sensor_name: str,
    instance: Any,
) -> AssetCheckEvaluation:
    files = left.files
    uris = [sink.uri(f) for f in files]
    foreign = len(files) - len(left.data_files)
    if left.data_files:
        text = (
            f"{checks.where(day)}: the day folder holds {len(files)} file(s) its manifest does "
            f"not name, left by a run that was killed while publishing: {', '.join(uris)}. Glob "
            f"readers (date=*/*.csv.gz) would read their rows too; {action} (re-materializing "
            "the day removes its older data files)"
        )
        if foreign:
            text += (
                f"; {foreign} of them are not pg_assets data files, which no run removes: "
                "delete those by hand"
            )
    else:
        action = "no run requested: a run removes only older pg_assets data files"
        text = (
            f"{checks.where(day)}: the day folder holds {foreign} file(s) that pg_assets did not "
            f"write and its manifest does not name: {', '.join(uris)}. Glob readers may read "
            f"them too; {action}, so delete those by hand"
        )
    meta = {
        "other_files": MetadataValue.json(uris),
        "detected_by": MetadataValue.text(f"sensor {sensor_name}"),
        "action": MetadataValue.text(action),
    }
    return evaluation(checks, BRONZE_READABLE, day.isoformat(), False, text, meta,
                      instance=instance, severity=AssetCheckSeverity.WARN)  # fmt: skip


def _max_per_run(asset_def: AssetsDefinition) -> int | None:
    policy = asset_def.backfill_policy
    if policy is None:
        return 1  # the asset runs one partition per run
    return policy.max_partitions_per_run  # None: single_run, any number of days in one run


def build_late_data_sensor(
    project: ProjectConfig, resolved: ResolvedTable, asset_def: AssetsDefinition
) -> SensorDefinition:
    table = resolved.config
    checks = day_checks_for(project, table, asset_def.key)
    cfg = checks.config
    name = f"{asset_def.op.name}__late_data"
    key = asset_def.key
    max_per_run = _max_per_run(asset_def)

    @sensor(
        name=name,
        asset_selection=AssetSelection.assets(key),
        minimum_interval_seconds=cfg.sensor_interval_s,
        default_status=DefaultSensorStatus.STOPPED,
        description=(
            f"Re-counts the last {cfg.window_days} closed days of {table.name} in PostgreSQL in "
            "one grouped query and compares them with their Bronze manifests; a day that "
            "changed fails its matches_source check, a day folder holding files a killed run "
            "left fails bronze_readable (WARN)"
            + (", and both are re-materialized." if cfg.late_data == "rematerialize" else ".")
        ),
    )
    def _late_data(
        context: SensorEvaluationContext, postgres: PostgresResource, bronze: BronzeResource
    ) -> SensorResult | SkipReason:
        started = time.perf_counter()
        today = dt.datetime.now(ZoneInfo(table.timezone)).date()
        window = closed_window(today, resolved.start, cfg.window_days)
        if window is None:
            return SkipReason(f"table {table.name}: no closed day since {resolved.start}")
        first, last = window
        where = f"table {table.name}, days {first}..{last}"
        try:
            sink = bronze.get_sink()
            folders = read_folders(sink, checks, first, last)
        except Exception as e:
            raise RuntimeError(f"{where}: reading the manifests from Bronze failed: {e}") from e
        manifests = folders.manifests
        read_s = time.perf_counter() - started
        cursor = json.loads(context.cursor) if context.cursor else {}
        seen_left: dict[str, str] = cursor.get("leftovers", {})
        try:
            with postgres.connection() as conn:
                recount = find_changes(conn, checks, manifests, first, last)
                leftovers, still_left = confirm_leftovers(
                    conn, sink, checks, folders, context.log, seen_left
                )
        except Exception as e:
            raise RuntimeError(f"{where}: re-counting the days in PostgreSQL failed: {e}") from e
        changes = recount.changes
        if recount.note:
            context.log.warning(f"{where}: {recount.note}")
        took = time.perf_counter() - started
        summary = (
            f"{where}: {len(manifests)} day(s) in Bronze, {len(changes)} changed, "
            f"{len(leftovers) + len(still_left)} with files their manifest does not name "
            f"(manifests {read_s:.2f} s, "
            f"total {took:.2f} s)"
        )
        context.log.info(summary)
        reported: dict[str, str] = {
            d: s for d, s in cursor.get("reported", {}).items() if d >= first.isoformat()
        }
        new = [c for c in changes if reported.get(c.day.isoformat()) != c.state]
        for c in changes:
            reported[c.day.isoformat()] = c.state
        # leftovers: reported once per set of files; a day cleaned up leaves the cursor
        left_now = still_left | {
            d.isoformat(): _files_state(left.files) for d, left in leftovers.items()
        }
        new_left = {
            d: left
            for d, left in leftovers.items()
            if seen_left.get(d.isoformat()) != left_now[d.isoformat()]
        }
        next_cursor = json.dumps({"reported": reported, "leftovers": left_now}, sort_keys=True)
        if not new and not new_left:
            return SensorResult(skip_reason=SkipReason(summary), cursor=next_cursor)
        run_requests = []
        actions: dict[dt.date, str] = {}
        if cfg.late_data == "rematerialize":
            states_of = {c.day: c.state for c in new}
            for d, left in new_left.items():
                if left.data_files:  # a run removes older data versions, nothing else
                    states_of[d] = states_of.get(d, "") + "|left:" + left_now[d.isoformat()]
            for lo, hi in day_ranges(list(states_of), max_per_run):
                states = "|".join(v for d, v in sorted(states_of.items()) if lo <= d <= hi)
                digest = hashlib.sha256(states.encode()).hexdigest()[:16]
                tags = {"pg_assets/trigger": "late_data"}
                span = lo.isoformat() if lo == hi else f"{lo}...{hi}"
                if lo == hi:
                    rr = RunRequest(run_key=f"late_data:{span}:{digest}", asset_selection=[key],
                                    partition_key=lo.isoformat(), tags=tags)  # fmt: skip
                else:
                    tags |= {ASSET_PARTITION_RANGE_START_TAG: lo.isoformat(),
                             ASSET_PARTITION_RANGE_END_TAG: hi.isoformat()}  # fmt: skip
                    rr = RunRequest(run_key=f"late_data:{span}:{digest}", asset_selection=[key],
                                    tags=tags)  # fmt: skip
                run_requests.append(rr)
                for d in states_of:
                    if lo <= d <= hi:
                        actions[d] = f"re-materialization of {span} requested"
        warn = "late_data: warn, no run requested"
        events = [
            _evaluation(checks, c, actions.get(c.day, warn), name, context.instance) for c in new
        ]
        events += [
            _leftover_evaluation(
                checks, sink, d, left, actions.get(d, warn), name, context.instance
            )
            for d, left in sorted(new_left.items())
        ]
        return SensorResult(run_requests=run_requests, asset_events=events, cursor=next_cursor)

    return _late_data

"""One partition, end to end: lock → snapshot → plan → stream → commit → publish → manifest.

This is the whole of what a Dagster materialization does for one day, with no Dagster in
it, so it can be run and tested from plain Python (and benchmarked without an orchestrator).

The protocol, and why each step is where it is:

1. **Lock the day.** A session-level advisory lock keyed by source, table and day, taken with
   a bounded wait (`lock_timeout_s`): a schedule and a backfill of the same day cannot
   interleave; the loser waits, then fails naming the partition and the holder. The lock is
   checked again on its session just before the commit point, so a run that lost its
   connection (and with it the lock) never commits.
2. **Read in one snapshot.** A REPEATABLE READ, READ ONLY transaction locks the relations
   the plan reads (`lock_plan`, before the snapshot is taken, so concurrent DDL either
   finished before it or waits), records the snapshot (`pg_current_snapshot()`, and an LSN
   that bounds every commit it sees from above) and the session settings that shape COPY's
   text output, and streams the COPY into a staging file. The transaction ends as soon as
   COPY does: uploads and their retries never hold back vacuum.
3. **Publish data under a new name** (`<T>-<day>-<version>.csv.gz`), checked against the
   number of bytes the compressor produced. Nothing is overwritten, so every earlier version
   and its manifest are still consistent.
4. **Commit by replacing the manifest** (stage, then rename over `_manifest.json`). This is
   the single commit point: before it the previous version stands (our new data file is
   deleted again), after it the new version does. A lost response is recognised by reading
   the manifest back.
5. **Remove superseded data files** of the day (older versions, other codecs), so glob
   readers see exactly one data file per day once a run has ended. If that fails, the new
   version is committed and the error says which files remain (a rerun removes them).
"""

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from pg_assets import __version__
from pg_assets.core.compression import Codec
from pg_assets.core.copy_stream import CopyStats, stream_copy
from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import (
    PartitionPaths,
    daily_paths,
    new_version,
    table_folder,
    version_key,
)
from pg_assets.core.planner import (
    CatalogError,
    CopyPlan,
    TableInfo,
    describe_table,
    lock_plan,
    plan_day,
)
from pg_assets.core.publish import (
    advisory_lock,
    commit_state,
    file_facts,
    read_manifest_at,
    snapshot_facts,
)
from pg_assets.core.session import PINNED_SETTINGS
from pg_assets.core.verify import DayCount, content_hash_record, count_day
from pg_assets.sinks.base import PreconditionFailed, Published, Sink, StagingFile

MANIFEST_VERSION = 2
HISTORY_KEPT = 20


class ExtractionError(RuntimeError):
    """An extraction failed; the message names the table and partition, the cause is chained."""


class PartitionBusyError(ExtractionError):
    """Another run holds this partition's lock beyond the configured wait."""


class LeftoverFilesError(ExtractionError):
    """The new version is committed, but superseded data files could not be removed."""

    def __init__(self, message: str, result: "ExtractResult") -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class ExtractResult:
    stats: CopyStats
    plan: CopyPlan
    info: TableInfo
    published: Published
    manifest: dict[str, Any]
    previous: dict[str, Any] | None  # the manifest this one replaced
    removed: tuple[str, ...]  # superseded data files deleted after the commit

    @property
    def snapshot(self) -> dict[str, str]:
        return self.manifest["snapshot"]


def _jsonable(v: Any) -> Any:
    return v.isoformat() if isinstance(v, dt.date | dt.datetime) else v


def lock_key(source: str, table: QualifiedName, day: dt.date) -> str:
    return f"pg_assets:{table_folder(source, table)}:{day.isoformat()}"


@contextmanager
def partition_lock(
    conn: psycopg.Connection, key: str, wait_s: float, where: str, run_id: str = ""
) -> Iterator[None]:
    """Hold the day's lock for the block; another run of the day makes us wait, boundedly."""

    def busy(holder: str) -> Exception:
        return PartitionBusyError(
            f"{where}: {holder} is extracting this partition; gave up after waiting "
            f"{wait_s:g} s (postgres.lock_timeout_s)"
        )

    app = f"pg_assets run {run_id[:8]}" if run_id else "pg_assets"
    with advisory_lock(conn, key, wait_s, application_name=app, busy=busy):
        yield


def _history(previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not previous:
        return []
    entry = {
        k: previous.get(k)
        for k in ("file", "rows", "sha256", "compressed_bytes", "extracted_at", "run_id")
    }
    if entry["file"] is None and previous.get("uri"):  # layout v1 manifests have no `file`
        entry["file"] = str(previous["uri"]).rsplit("/", 1)[-1]
    return [entry, *previous.get("history", [])][:HISTORY_KEPT]


def _remove_superseded(
    sink: Sink,
    paths: PartitionPaths,
    version: str,
    *,
    keep: str,
    previous: dict[str, Any] | None,
) -> tuple[tuple[str, ...], list[str]]:
    """Delete the day's data files older than `version`: earlier versions, other codecs,
    orphans of failed runs. Never a newer one: it belongs to a run that started after ours
    and may be about to commit (only if ours lost its lock; its commit then fails, and it
    takes its file back out itself). Returns what was removed and what could not be."""
    candidates: set[str] = set()
    problems: list[str] = []
    if previous and previous.get("file"):
        candidates.add(f"{paths.folder}/{previous['file']}")
    try:
        candidates.update(sink.list_files(paths.folder))
    except Exception as e:
        problems.append(f"could not list {paths.folder} to find them ({e})")
    removed = []
    for rel in sorted(candidates):
        if rel == keep or not paths.is_data_file(rel):
            continue
        other = paths.version_of(rel)
        if other is not None and version_key(other) > version_key(version):
            continue
        try:
            sink.delete(rel)
            removed.append(rel)
        except Exception as e:
            problems.append(f"{rel} ({e})")
    return tuple(removed), problems


def extract_day(
    conn: psycopg.Connection,
    *,
    source: str,
    table: QualifiedName,
    column: str,
    day: dt.date,
    timezone: str,
    sink: Sink,
    codec: Codec,
    level: int,
    run_id: str,
    block_size: int = 4 << 20,
    info: TableInfo | None = None,
    lock_timeout_s: float = 60,
    content_hash: bool = False,
) -> ExtractResult:
    """Extract, publish and commit one day of `table` on the pooled connection `conn`.

    `info` is the table's catalog description, read once per run by the caller (a ranged run
    plans many days from one description; `lock_plan` re-checks it inside each day's
    snapshot). `conn` must be idle; it is left idle. With `content_hash`, the day's
    order-independent content hash is computed in the same snapshot as the COPY and stored in
    the manifest, for the `matches_source` check to compare against later.
    """
    partition_key = day.isoformat()
    where = f"table {table}, partition {partition_key}"
    paths = daily_paths(source, table, day)
    with partition_lock(conn, lock_key(source, table, day), lock_timeout_s, where, run_id):
        try:
            return _extract_locked(
                conn, where=where, source=source, table=table, column=column, day=day,
                timezone=timezone, sink=sink, codec=codec, level=level, run_id=run_id,
                block_size=block_size, info=info, lock_timeout_s=lock_timeout_s, paths=paths,
                content_hash=content_hash,
            )  # fmt: skip
        except (ExtractionError, CatalogError):
            raise
        except Exception as e:
            raise ExtractionError(f"extracting {where} failed: {e}") from e


def _extract_locked(
    conn: psycopg.Connection,
    *,
    where: str,
    source: str,
    table: QualifiedName,
    column: str,
    day: dt.date,
    timezone: str,
    sink: Sink,
    codec: Codec,
    level: int,
    run_id: str,
    block_size: int,
    info: TableInfo | None,
    lock_timeout_s: float,
    paths: PartitionPaths,
    content_hash: bool = False,
) -> ExtractResult:
    if info is None:
        with conn.transaction():
            info = describe_table(conn, table, column)
    # What the commit will replace, read before our data file exists: the manifest is
    # replaced only if it is still this one, so a run that lost the day's lock (its session
    # died) can never overwrite a version another run committed meanwhile.
    previous_at, previous = read_manifest_at(sink, paths.manifest)
    staging: StagingFile | None = None
    version = new_version()
    data_rel = paths.data(version, codec.extension)
    body: bytes | None = None
    committed: bool | None = False  # None: could not tell
    try:
        staging = sink.open_staging(run_id, data_rel, codec.content_type)
        with conn.transaction():  # REPEATABLE READ, READ ONLY (the pool configures it)
            # first thing: locks before the snapshot, then the plan re-checked in it (and the
            # session's pinned settings verified)
            plan = lock_plan(conn, info, plan_day(info, day, timezone), lock_timeout_s)
            info = plan.info
            snapshot = snapshot_facts(conn)
            with conn.cursor() as cur:
                stats = stream_copy(
                    cur, plan.statement, staging, codec.compressor(level), block_size=block_size
                )
            hashed: DayCount | None = None
            if content_hash:  # same snapshot as the COPY: the hash describes exactly these rows
                names = [c.name for c in info.columns]
                hashed = count_day(conn, plan, info.partition_column.name, names)
        # the snapshot is released: what follows waits on the lake only
        published = sink.publish(staging, data_rel, expected_size=stats.compressed_bytes)
        staging = None
        manifest = {
            "version": MANIFEST_VERSION,
            "pg_assets_version": __version__,
            "kind": "daily",
            "source": source,
            "table": str(table),
            "schema_name": table.schema,
            "table_name": table.name,
            "partition": day.isoformat(),
            **file_facts(data_rel, published, stats, codec, level),
            "columns": [asdict(c) for c in info.columns],
            "source_relation": str(plan.relation),
            "strategy": plan.strategy,
            "partition_column": info.partition_column.name,
            "timezone": timezone,
            "bounds": {"lower": _jsonable(plan.lower), "upper": _jsonable(plan.upper)},
            "snapshot": snapshot,
            "session": dict(PINNED_SETTINGS),
            "extracted_at": dt.datetime.now(dt.UTC).isoformat(),
            "seconds": round(stats.seconds, 3),
            "run_id": run_id,
            "history": _history(previous),
        }
        if hashed is not None:
            manifest["content_hash"] = content_hash_record(hashed)
        body = json.dumps(manifest, indent=2).encode()
        with conn.transaction():
            conn.execute("SELECT 1")  # still connected, so still holding the day's lock
        try:
            sink.write_bytes(
                run_id, paths.manifest, body, "application/json",
                if_match=previous_at.etag if previous_at else None,
                if_none_match=previous_at is None,
            )  # fmt: skip
            committed = True
        except PreconditionFailed as e:
            raise ExtractionError(
                f"{where}: another run committed this partition while this one was publishing "
                f"(this run's lock on the day was lost with its session), so this run's "
                f"version is discarded: {e}"
            ) from e
        except Exception as e:
            committed = commit_state(sink, paths.manifest, body)
            if committed is None:
                raise ExtractionError(
                    f"publishing the manifest of {where} failed and the lake could not be read "
                    f"back to tell whether it happened ({e}); {data_rel} is kept, and the next "
                    "run of the day settles which version stands"
                ) from e
            if not committed:
                raise ExtractionError(
                    f"publishing the manifest of {where} failed, so the previous version stays "
                    f"published: {e}"
                ) from e
    except BaseException:
        if staging is not None:
            sink.discard(staging)
        if committed is False and body is not None:  # interrupted in the commit: look
            committed = commit_state(sink, paths.manifest, body)
        if committed is False:
            try:
                sink.delete(data_rel)  # not committed: take the new data file back out
            except Exception:
                pass  # an orphan without manifest; the next publish of the day removes it
        raise
    removed, leftovers = _remove_superseded(sink, paths, version, keep=data_rel, previous=previous)
    result = ExtractResult(stats, plan, info, published, manifest, previous, removed)
    if leftovers:
        raise LeftoverFilesError(
            f"{where}: the new version is published, but superseded data files could not be "
            f"removed (a rerun removes them): {'; '.join(leftovers)}",
            result,
        )
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the address space, so unlike ru_maxrss it
    does not inherit the high-water mark of the parent that forked us."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Extract one day without Dagster: `python -m pg_assets.core.extract --help`.

    Prints the stats and the process's peak RSS as JSON; the benchmark and the memory test
    run it as a separate process so its peak memory is its own. Bad input ends in one line
    on stderr naming what is wrong, like `pg-assets check`.
    """
    import argparse
    import os
    import sys
    import uuid
    from zoneinfo import ZoneInfo

    from pg_assets.core.compression import get_codec
    from pg_assets.core.identifiers import parse_column_name, parse_qualified_name

    p = argparse.ArgumentParser(
        prog="python -m pg_assets.core.extract",
        description="Extract one day of one PostgreSQL table into Bronze, without Dagster.",
    )
    p.add_argument("--conninfo-env", default="PG_ASSETS_CONNINFO",
                   help="environment variable holding the libpq connection string")  # fmt: skip
    p.add_argument("--table", required=True, help="schema.table, as typed in psql")
    p.add_argument("--column", required=True, help="the date/timestamp/timestamptz column")
    p.add_argument("--day", required=True, help="the day to extract, YYYY-MM-DD")
    p.add_argument("--timezone", default="UTC", help="day boundaries for timestamptz columns")
    p.add_argument("--root", required=True, help="Bronze root: local path or abfss:// URI")
    p.add_argument("--endpoint", help="ADLS account URL override (emulators, test servers)")
    p.add_argument("--auth", default="default_credential",
                   help="ADLS auth: connection_string, account_key, sas, default_credential")  # fmt: skip
    p.add_argument("--secret-env", help="environment variable holding the ADLS secret")
    p.add_argument("--source", default="cli", help="source name: the first folder under root")
    p.add_argument("--codec", default="gzip", help="gzip, zstd or none")
    p.add_argument("--level", type=int, help="compression level (default: the codec's)")
    p.add_argument("--block-size-mib", type=float, default=4, help="write/append block size")
    p.add_argument("--lock-timeout-s", type=float, default=60,
                   help="how long to wait for another run of the same day")  # fmt: skip
    a = p.parse_args(argv)

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        day = dt.date.fromisoformat(a.day)
    except ValueError:
        return fail(f"--day {a.day!r} is not a date (YYYY-MM-DD)")
    try:
        ZoneInfo(a.timezone)
    except Exception:
        return fail(f"--timezone {a.timezone!r} is not a known time zone (e.g. Europe/Berlin)")
    try:
        codec = get_codec(a.codec)
        level = codec.default_level if a.level is None else a.level
        codec.compressor(level)
        name = parse_qualified_name(a.table)
        column = parse_column_name(a.column)
    except ValueError as e:
        return fail(str(e))
    conninfo = os.environ.get(a.conninfo_env)
    if not conninfo:
        return fail(f"environment variable {a.conninfo_env} is not set; it must hold the "
                    "PostgreSQL connection string")  # fmt: skip
    try:
        sink = _cli_sink(a)
    except Exception as e:
        return fail(f"Bronze at {a.root} is not usable: {e}")
    from pg_assets.core.session import connect_kwargs

    try:
        with psycopg.connect(conninfo, **connect_kwargs(10, 0, conninfo)) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            result = extract_day(
                conn, source=a.source, table=name, column=column, day=day,
                timezone=a.timezone, sink=sink, codec=codec, level=level,
                run_id=uuid.uuid4().hex, block_size=int(a.block_size_mib * 1024 * 1024),
                lock_timeout_s=a.lock_timeout_s,
            )  # fmt: skip
    except CatalogError as e:
        return fail(str(e))  # it names the table
    except (ExtractionError, psycopg.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = {
        **asdict(result.stats),
        "strategy": result.plan.strategy,
        "uri": result.published.uri,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(out))
    return 0


def _cli_sink(a: Any) -> Sink:
    if a.root.startswith("abfss://"):
        from pg_assets.sinks.adls import AdlsSink

        return AdlsSink.from_uri(a.root, auth=a.auth, secret_env=a.secret_env, endpoint=a.endpoint)
    from pg_assets.sinks.local import LocalSink

    return LocalSink(a.root.removeprefix("file://"))


if __name__ == "__main__":
    raise SystemExit(main())

"""One partition, end to end: snapshot → plan → stream → stage → publish → manifest.

This is the whole of what a Dagster materialization does, with no Dagster in it, so it can
be run and tested from plain Python (and benchmarked without an orchestrator).

Publish order, chosen so a reader that trusts only partitions with a manifest never sees a
mix of versions: (1) stream the data into staging; on any failure discard it — the previous
version is untouched; (2) remove the old manifest; (3) rename the staged data over the old
file; (4) stage and rename the new manifest. Between (2) and (4) the partition has no
manifest and is simply "not ready"; its sha256 in the manifest lets a reader verify the data.
"""

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from pg_assets import __version__
from pg_assets.core.compression import Codec
from pg_assets.core.copy_stream import CopyStats, stream_copy
from pg_assets.core.layout import PartitionPaths
from pg_assets.core.planner import CopyPlan, TableInfo
from pg_assets.sinks.base import Published, Sink


class ExtractionError(RuntimeError):
    """An extraction failed; the message names the table and partition, the cause is chained."""


@dataclass(frozen=True)
class ExtractResult:
    stats: CopyStats
    plan: CopyPlan
    published: Published
    manifest: dict[str, Any]
    snapshot_lsn: str


def snapshot_lsn(conn: psycopg.Connection) -> str:
    """The WAL position of the transaction's snapshot (replay position on a standby)."""
    row = conn.execute(
        "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
        " ELSE pg_current_wal_lsn() END::text"
    ).fetchone()
    return row[0] if row else ""


def _jsonable(v: Any) -> Any:
    return v.isoformat() if isinstance(v, dt.date | dt.datetime) else v


def extract_partition(
    conn: psycopg.Connection,
    *,
    info: TableInfo,
    plan: CopyPlan,
    sink: Sink,
    paths: PartitionPaths,
    codec: Codec,
    level: int,
    run_id: str,
    partition_key: str,
    block_size: int = 4 << 20,
) -> ExtractResult:
    """Extract one planned partition inside the caller's snapshot transaction on `conn`."""
    where = f"table {info.name}, partition {partition_key}"
    lsn = snapshot_lsn(conn)
    staging = None
    try:
        staging = sink.open_staging(run_id, paths.data, codec.content_type)
        with conn.cursor() as cur:
            stats = stream_copy(
                cur, plan.statement, staging, codec.compressor(level), block_size=block_size
            )
        staging.close()
        sink.delete(paths.manifest)
        published = sink.publish(staging, paths.data, expected_size=stats.compressed_bytes)
    except BaseException as e:
        if staging is not None:
            sink.discard(staging)
        if isinstance(e, Exception):
            raise ExtractionError(f"extracting {where} failed: {e}") from e
        raise
    manifest = {
        "version": 1,
        "pg_assets_version": __version__,
        "table": str(info.name),
        "partition": partition_key,
        "source_relation": str(plan.relation),
        "strategy": plan.strategy,
        "partition_column": info.partition_column.name,
        "bounds": {"lower": _jsonable(plan.lower), "upper": _jsonable(plan.upper)},
        "rows": stats.rows,
        "raw_bytes": stats.raw_bytes,
        "compressed_bytes": stats.compressed_bytes,
        "sha256": stats.sha256,
        "codec": codec.name,
        "level": level,
        "format": "csv, header (PostgreSQL COPY)",
        "columns": [asdict(c) for c in info.columns],
        "snapshot_lsn": lsn,
        "extracted_at": dt.datetime.now(dt.UTC).isoformat(),
        "uri": published.uri,
        "etag": published.etag,
        "seconds": round(stats.seconds, 3),
    }
    try:
        sink.write_bytes(
            run_id, paths.manifest, json.dumps(manifest, indent=2).encode(), "application/json"
        )
    except Exception as e:
        raise ExtractionError(f"writing the manifest of {where} failed: {e}") from e
    return ExtractResult(stats, plan, published, manifest, lsn)


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
    run it as a separate process so its peak memory is its own.
    """
    import argparse
    import os
    import uuid

    from pg_assets.core.compression import get_codec
    from pg_assets.core.identifiers import parse_column_name, parse_qualified_name
    from pg_assets.core.layout import daily_paths
    from pg_assets.core.planner import describe_table, plan_day
    from pg_assets.sinks.local import LocalSink

    p = argparse.ArgumentParser(prog="python -m pg_assets.core.extract")
    p.add_argument("--conninfo-env", default="PG_ASSETS_CONNINFO")
    p.add_argument("--table", required=True)
    p.add_argument("--column", required=True)
    p.add_argument("--day", required=True, type=dt.date.fromisoformat)
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--root", required=True, help="local path or abfss:// URI")
    p.add_argument("--endpoint", help="ADLS account URL override (test server)")
    p.add_argument("--auth", default="default_credential")
    p.add_argument("--secret-env")
    p.add_argument("--source", default="cli")
    p.add_argument("--codec", default="gzip")
    p.add_argument("--level", type=int)
    p.add_argument("--block-size-mib", type=float, default=4)
    a = p.parse_args(argv)

    codec = get_codec(a.codec)
    level = codec.default_level if a.level is None else a.level
    name = parse_qualified_name(a.table)
    if a.root.startswith("abfss://"):
        from pg_assets.sinks.adls import AdlsSink

        sink: Sink = AdlsSink.from_uri(
            a.root, auth=a.auth, secret_env=a.secret_env, endpoint=a.endpoint
        )
    else:
        sink = LocalSink(a.root)
    with psycopg.connect(os.environ[a.conninfo_env], application_name="pg_assets") as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            info = describe_table(conn, name, parse_column_name(a.column))
            result = extract_partition(
                conn,
                info=info,
                plan=plan_day(info, a.day, a.timezone),
                sink=sink,
                paths=daily_paths(a.source, name, a.day, codec.extension),
                codec=codec,
                level=level,
                run_id=uuid.uuid4().hex,
                partition_key=a.day.isoformat(),
                block_size=int(a.block_size_mib * 1024 * 1024),
            )
    out = {
        **asdict(result.stats),
        "strategy": result.plan.strategy,
        "uri": result.published.uri,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

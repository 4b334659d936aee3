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
    staging = sink.open_staging(run_id, paths.data, codec.content_type)
    try:
        with conn.cursor() as cur:
            stats = stream_copy(
                cur, plan.statement, staging, codec.compressor(level), block_size=block_size
            )
        staging.close()
    except BaseException as e:
        sink.discard(staging)
        if isinstance(e, Exception):
            raise ExtractionError(f"extracting {where} failed: {e}") from e
        raise
    try:
        sink.delete(paths.manifest)
        published = sink.publish(staging, paths.data)
    except BaseException:
        sink.discard(staging)
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
    sink.write_bytes(
        run_id, paths.manifest, json.dumps(manifest, indent=2).encode(), "application/json"
    )
    return ExtractResult(stats, plan, published, manifest, lsn)

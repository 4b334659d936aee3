"""What every kind of Bronze write shares — daily days, incremental batches, CDC batches.

- **One writer per unit of work**: a session-level advisory lock (the day, the table's next
  batch, the source's slot) taken with a bounded wait; the loser's error names the holder.
  Session-level, not transaction-level, because the lock must outlive the read transaction
  (which ends with the COPY) until the manifest is committed.
- **The manifest is the commit point**, written as a compare-and-swap (replace only the
  version read, or create only), and a lost response is told from a failure by reading back
  what the store holds (`commit_state`: yes, no, or could not tell — never taken as no).
- **Every manifest states the same facts about its file** (`file_facts`), so checks and
  readers treat all three kinds alike.
"""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from pg_assets.core.compression import Codec
from pg_assets.core.copy_stream import CopyStats
from pg_assets.sinks.base import FileInfo, PreconditionFailed, Published, Sink

FORMAT = "csv, header (PostgreSQL COPY)"


def lock_holder(conn: psycopg.Connection, key: str) -> str:
    """Who holds the advisory lock `key`, for an error message."""
    return held_by(conn, key) or "another run"


def held_by(conn: psycopg.Connection, key: str) -> str | None:
    """Who holds the advisory lock `key` right now (a run in progress), or None."""
    with conn.transaction():
        row = conn.execute(
            """SELECT a.pid, a.application_name, a.backend_start
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                 AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(%s, 0)
               LIMIT 1""",
            (key,),
        ).fetchone()
    if row is None:
        return None
    pid, app, since = row  # another role's session may hide its name and start (NULL)
    connected = f", connected {since:%Y-%m-%d %H:%M:%S%z}" if since else ""
    return f"another run ({app or 'unnamed'}, PostgreSQL backend {pid}{connected})"


@contextmanager
def advisory_lock(
    conn: psycopg.Connection,
    key: str,
    wait_s: float,
    *,
    application_name: str,
    busy: Callable[[str], Exception],
) -> Iterator[None]:
    """Hold the session-level advisory lock `key` for the block, waiting at most `wait_s`.

    `application_name` is set on the session first, so a DBA (and the loser's error) sees
    which run holds what; `busy(holder)` builds the error raised when the wait runs out.
    """
    try:
        with conn.transaction():
            conn.execute(
                "SELECT set_config('application_name', %s, false)", (application_name[:63],)
            )
            conn.execute(
                "SELECT set_config('lock_timeout', %s, true)",
                (f"{max(1, int(wait_s * 1000))}ms",),
            )
            conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
    except pg_errors.LockNotAvailable:
        raise busy(lock_holder(conn, key)) from None
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
            except psycopg.Error:
                pass  # the session is gone, and its locks with it


def read_manifest(sink: Sink, relpath: str) -> dict[str, Any] | None:
    """The manifest at `relpath`, or None if there is none (or it is not a manifest)."""
    return read_manifest_at(sink, relpath)[1]


def read_manifest_at(sink: Sink, relpath: str) -> tuple[FileInfo | None, dict[str, Any] | None]:
    """The manifest at `relpath` with what the store reports for it (its etag is the
    condition of the next commit), or (None, None) if there is none."""
    info = sink.stat(relpath)
    if info is None:
        return None, None
    try:
        manifest = json.loads(sink.read_bytes(relpath))
    except FileNotFoundError:
        return None, None
    except ValueError:
        return info, None
    return info, manifest if isinstance(manifest, dict) else None


def commit_state(sink: Sink, relpath: str, body: bytes) -> bool | None:
    """After a failed commit of `body` to `relpath`: True if it happened all the same (a lost
    response), False if surely not (missing, or other bytes there), None if the store could
    not be read. "Could not tell" is never taken as "no": deleting the data of a commit that
    did happen would leave a manifest naming a missing file."""
    try:
        return sink.read_bytes(relpath) == body
    except FileNotFoundError:
        return False
    except Exception:
        return None


def committed_by(sink: Sink, relpath: str) -> str:
    """Who committed the manifest at `relpath`, for the error of a run whose create-only
    commit found it there: "run <run_id>" (best effort: "another run" if it cannot be read)."""
    try:
        manifest = read_manifest(sink, relpath) or {}
    except Exception:
        return "another run"
    return f"run {manifest['run_id']}" if manifest.get("run_id") else "another run"


@dataclass(frozen=True)
class CreateOnly:
    """The outcome of a create-only commit (`commit_create_only`)."""

    done: bool | None  # committed; False: surely not; None: could not tell (delete nothing)
    error: Exception | None = None  # why it is not plainly done
    taken_by: str | None = None  # another writer's commit was there first: who


def commit_create_only(sink: Sink, run_id: str, relpath: str, body: bytes) -> CreateOnly:
    """Write a manifest that may exist only once (a batch's, a snapshot's): of two runs that
    both believe they hold the lock, only the first commits. A failed or lost request is
    checked against what the store holds (`commit_state`)."""
    try:
        sink.write_bytes(run_id, relpath, body, "application/json", if_none_match=True)
    except PreconditionFailed as e:
        return CreateOnly(False, e, taken_by=committed_by(sink, relpath))
    except Exception as e:
        return CreateOnly(commit_state(sink, relpath, body), e)
    return CreateOnly(True)


def snapshot_facts(conn: psycopg.Connection) -> dict[str, str]:
    """The transaction's exact snapshot, and a WAL position above every commit it sees."""
    row = conn.execute(
        "SELECT pg_current_snapshot()::text,"
        " CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
        " ELSE pg_current_wal_insert_lsn() END::text"
    ).fetchone()
    assert row is not None
    return {"txid_snapshot": row[0], "lsn_upper_bound": row[1]}


def file_facts(
    data_rel: str, published: Published, stats: CopyStats, codec: Codec, level: int
) -> dict[str, Any]:
    """What a manifest says about the data file it commits."""
    return {
        "file": data_rel.rsplit("/", 1)[-1],
        "uri": published.uri,
        "etag": published.etag,
        "rows": stats.rows,
        "raw_bytes": stats.raw_bytes,
        "compressed_bytes": stats.compressed_bytes,
        "sha256": stats.sha256,
        "codec": codec.name,
        "level": level,
        "format": FORMAT,
    }

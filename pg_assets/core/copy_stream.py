"""COPY ... TO STDOUT, compressed on the fly, written in fixed-size blocks.

The pipeline has two stages joined by a small bounded queue:

    caller thread:  psycopg `cursor.copy()` ─ gather ~1 MiB ─► queue (depth N)
    worker thread:  compress (GIL released by isal/zlib/zstd) ─ sha256 ─ cut into
                    `block_size` blocks ─► `writer.write(block)`

so the server's COPY, the compressor and the sink all make progress at once and memory is
bounded by (gather size × queue depth) + block size, whatever the partition's size. psycopg's
Copy iterator yields roughly one row per chunk in CSV, which is why chunks are gathered
before compressing: per-call overhead would otherwise dominate.

The queue is a `Handoff`: neither side ever blocks on it for good. A failure in the worker
(writer or compressor, on any block including the last, which is written only after the
COPY ends) reaches the caller's thread as the worker's own exception within a poll interval;
a failure or interrupt in the caller's thread stops the worker.

Nothing here knows about Dagster; failures propagate as ordinary exceptions and the caller
decides what to publish (see `pg_assets.core.extract`).
"""

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import sql

from pg_assets.core.compression import Compressor
from pg_assets.core.handoff import Handoff

GATHER_BYTES = 1 << 20
STALL_S = 3600.0  # a writer silent this long (a hung mount) fails the copy
ABORT_GRACE_S = 10.0  # after a failure, how long the worker may take to notice and stop
_DONE = object()


class BlockWriter(Protocol):
    """Where compressed blocks go: a staging file on the local disk or on ADLS."""

    def write(self, block: bytes, /) -> None: ...


@dataclass(frozen=True)
class CopyStats:
    rows: int
    raw_bytes: int
    compressed_bytes: int
    sha256: str
    seconds: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.compressed_bytes if self.compressed_bytes else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.raw_bytes / 1e6 / self.seconds if self.seconds else 0.0


class BlockCutter:
    """Raw chunks → compressor → blocks of exactly `block_size` bytes (the last one shorter),
    with the sizes and sha256 a manifest records. Shared by the COPY pipeline (in its worker
    thread) and the CDC change files (synchronously: decoding holds the GIL anyway), so every
    Bronze file is cut and hashed the same way."""

    def __init__(self, compressor: Compressor, writer: BlockWriter, block_size: int) -> None:
        self._compressor = compressor
        self._writer = writer
        self._block_size = block_size
        self._pending = bytearray()
        self._sha = hashlib.sha256()
        self.raw_bytes = 0
        self.compressed_bytes = 0

    def write(self, chunk: bytes | bytearray, /) -> None:
        self.raw_bytes += len(chunk)
        self._emit(self._compressor.compress(chunk), final=False)

    def close(self) -> None:
        """Flush the compressor and write the last (short) block."""
        self._emit(self._compressor.flush(), final=True)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def _emit(self, data: bytes, final: bool) -> None:
        self._pending += data
        while len(self._pending) >= self._block_size or (final and self._pending):
            block = bytes(self._pending[: self._block_size])
            del self._pending[: self._block_size]
            self._sha.update(block)
            self.compressed_bytes += len(block)
            self._writer.write(block)


class _Watched:
    """The writer as the worker thread sees it: no block is written once the producer gave
    up, and each written block counts as progress for the stall watch."""

    def __init__(self, writer: BlockWriter, handoff: Handoff) -> None:
        self._writer, self._handoff = writer, handoff

    def write(self, block: bytes, /) -> None:
        self._handoff.raise_if_aborted()  # the producer gave up: stop writing
        self._writer.write(block)
        self._handoff.touch()


class _Compressing:
    """Consumes raw chunks, emits compressed blocks of exactly `block_size` (last one shorter)."""

    def __init__(self, compressor: Compressor, writer: BlockWriter, block_size: int) -> None:
        self._compressor, self._writer, self._block_size = compressor, writer, block_size
        self.cutter: BlockCutter | None = None

    @property
    def compressed_bytes(self) -> int:
        return self.cutter.compressed_bytes if self.cutter else 0

    @property
    def sha256(self) -> str:
        return self.cutter.sha256 if self.cutter else hashlib.sha256().hexdigest()

    def run(self, handoff: Handoff) -> None:
        self.cutter = cutter = BlockCutter(
            self._compressor, _Watched(self._writer, handoff), self._block_size
        )
        while (chunk := handoff.get()) is not _DONE:
            cutter.write(chunk)  # type: ignore[arg-type]
            handoff.touch()
        cutter.close()


def stream_copy(
    cursor: psycopg.Cursor,
    statement: sql.Composable,
    writer: BlockWriter,
    compressor: Compressor,
    *,
    block_size: int = 4 << 20,
    queue_depth: int = 4,
    gather_bytes: int = GATHER_BYTES,
    stall_s: float = STALL_S,
    abort_grace_s: float = ABORT_GRACE_S,
) -> CopyStats:
    """Run `statement` (a `COPY ... TO STDOUT`) and stream its compressed output to `writer`.

    Raises, in the caller's thread, whatever PostgreSQL, the compressor or the writer raised,
    whichever block it happened on (the last block is written only after the COPY has
    ended); KeyboardInterrupt and other BaseExceptions stop the background thread too. No
    wait is unbounded: a failing writer or compressor cancels the running COPY on the server
    so the caller does not wait for the rest of the scan, and a writer that makes no progress
    for `stall_s` seconds fails the copy with `Stalled`. On error the writer may hold a
    partial stream, which the caller must discard rather than publish.
    """
    started = time.perf_counter()
    worker = _Compressing(compressor, writer, block_size)
    handoff = Handoff(queue_depth, what="the compressing/writing thread", stall_s=stall_s)
    conn = cursor.connection
    copying = threading.Lock()  # held while the COPY runs, so a cancel never hits the next query
    in_copy = True

    def cancel_copy(_error: BaseException) -> None:
        # The worker failed: stop the server from scanning the rest of the partition. Only
        # while the COPY is still running; PostgreSQL ignores a cancel once it is idle.
        with copying:
            if in_copy:
                try:
                    conn.cancel_safe(timeout=5)
                except Exception:
                    pass

    handoff.start(lambda: worker.run(handoff), name="pg_assets-compress", on_error=cancel_copy)
    raw_bytes = 0
    try:
        try:
            with cursor.copy(statement) as copy:
                buf = bytearray()
                for data in copy:
                    buf += data
                    if len(buf) >= gather_bytes:
                        raw_bytes += len(buf)
                        handoff.put(buf)
                        buf = bytearray()
                if buf:
                    raw_bytes += len(buf)
                    handoff.put(buf)
        finally:
            with copying:
                in_copy = False
        rows = cursor.rowcount
        handoff.put(_DONE)
        handoff.finish()
    except BaseException as e:
        handoff.abort(grace_s=abort_grace_s)
        cause = handoff.error
        if cause is not None and cause is not e and isinstance(e, Exception):
            # the COPY was cancelled (or the put refused) because the worker failed first
            raise cause from None
        raise
    return CopyStats(
        rows=rows,
        raw_bytes=raw_bytes,
        compressed_bytes=worker.compressed_bytes,
        sha256=worker.sha256,
        seconds=time.perf_counter() - started,
    )

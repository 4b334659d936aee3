"""COPY ... TO STDOUT, compressed on the fly, written in fixed-size blocks.

The pipeline has two stages joined by a small bounded queue:

    caller thread:  psycopg `cursor.copy()` ─ gather ~1 MiB ─► queue (depth N)
    worker thread:  compress (GIL released by isal/zlib/zstd) ─ sha256 ─ cut into
                    `block_size` blocks ─► `writer.write(block)`

so the server's COPY, the compressor and the sink all make progress at once and memory is
bounded by (gather size × queue depth) + block size, whatever the partition's size. psycopg's
Copy iterator yields roughly one row per chunk in CSV, which is why chunks are gathered
before compressing: per-call overhead would otherwise dominate.

Nothing here knows about Dagster; failures propagate as ordinary exceptions and the caller
decides what to publish (see `pg_assets.core.publish`).
"""

import hashlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import sql

from pg_assets.core.compression import Compressor

GATHER_BYTES = 1 << 20
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


class _Compressing(threading.Thread):
    """Consumes raw chunks, emits compressed blocks of exactly `block_size` (last one shorter)."""

    def __init__(self, compressor: Compressor, writer: BlockWriter, block_size: int, depth: int):
        super().__init__(name="pg_assets-compress", daemon=True)
        self.inbox: queue.Queue[object] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.cutter = BlockCutter(compressor, writer, block_size)

    def run(self) -> None:
        try:
            while (chunk := self.inbox.get()) is not _DONE:
                if chunk is None:  # aborted by the producer
                    return
                self.cutter.write(chunk)  # type: ignore[arg-type]
            self.cutter.close()
        except BaseException as e:  # surfaced to the producer, which re-raises it
            self.error = e
            # keep draining so the producer never blocks on a full queue
            while self.inbox.get() not in (_DONE, None):
                pass

    def put(self, item: object) -> None:
        if self.error is not None:
            raise self.error
        self.inbox.put(item)


def stream_copy(
    cursor: psycopg.Cursor,
    statement: sql.Composable,
    writer: BlockWriter,
    compressor: Compressor,
    *,
    block_size: int = 4 << 20,
    queue_depth: int = 4,
    gather_bytes: int = GATHER_BYTES,
) -> CopyStats:
    """Run `statement` (a `COPY ... TO STDOUT`) and stream its compressed output to `writer`.

    Raises whatever PostgreSQL, the compressor or the writer raised; on error the writer may
    hold a partial stream, which the caller must discard rather than publish.
    """
    started = time.perf_counter()
    worker = _Compressing(compressor, writer, block_size, queue_depth)
    worker.start()
    raw_bytes = 0
    try:
        with cursor.copy(statement) as copy:
            buf = bytearray()
            for data in copy:
                buf += data
                if len(buf) >= gather_bytes:
                    raw_bytes += len(buf)
                    worker.put(buf)
                    buf = bytearray()
            if buf:
                raw_bytes += len(buf)
                worker.put(buf)
        rows = cursor.rowcount
        worker.put(_DONE)
    except BaseException:
        worker.inbox.put(None)
        worker.join()
        raise
    worker.join()
    if worker.error is not None:
        raise worker.error
    return CopyStats(
        rows=rows,
        raw_bytes=raw_bytes,
        compressed_bytes=worker.cutter.compressed_bytes,
        sha256=worker.cutter.sha256,
        seconds=time.perf_counter() - started,
    )

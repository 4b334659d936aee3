"""The contract every Bronze sink keeps: stage, check, then publish by rename.

A sink writes a new file under `_staging/`, which no reader looks at. `close` makes it
durable and returns the size the store itself reports, and `publish` refuses to go on unless
that is exactly the number of bytes the caller produced: a short write (a file size limit, a
full disk, a network filesystem) can never be published as a good file. Only then is the
staging file renamed onto its final path in one server-side (or filesystem) operation that
replaces the previous version. `discard` removes a staging file after a failure. The local
filesystem and ADLS Gen2 both have an atomic rename, so the same protocol gives the same
guarantee on both.

Staging files of a run that was killed (SIGKILL, a lost pod) stay in `_staging/`: nothing
else ever names them. `sweep_staging` removes those older than an age no run could spend on
one file, judged by the store's own last-modified time; a younger one may be another run's
file in progress and is never touched.

A request whose response is lost (the connection drops after the service applied it) is
recognised by looking at what the store holds, not reported as a failure of something that
succeeded: `publish` succeeds when the destination holds the staged bytes and the staging
file is gone, `delete` when the path is gone. When a sink cannot tell either way it raises
`PublishUncertain`, so a caller never mistakes "maybe" for "no".
"""

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator
from dataclasses import dataclass

STAGING_DIR = "_staging"
READ_CHUNK = 1 << 20


def staging_relpath(run_id: str, relpath: str) -> str:
    """`_staging/<run_id>-<token>-<file name>`: flat, so that cleaning up after a writer
    never means deleting a folder another writer of the same run is still using."""
    return f"{STAGING_DIR}/{run_id}-{uuid.uuid4().hex[:8]}-{relpath.rsplit('/', 1)[-1]}"


class SinkError(RuntimeError):
    """A sink operation failed; for `publish`, the destination was left as it was."""


class SizeMismatch(SinkError):
    """The staged file does not hold the bytes the caller produced; nothing was published."""


class PreconditionFailed(SinkError):
    """A conditional publish found the destination changed since the caller read it (another
    writer committed meanwhile); nothing was published."""


class PublishUncertain(SinkError):
    """A publish or delete failed in a way that left its outcome unknown (the request may have
    been applied and the check of the store failed too); the caller must look at the store."""


@dataclass(frozen=True)
class Published:
    uri: str
    size: int
    etag: str | None = None


@dataclass(frozen=True)
class FileInfo:
    """What the store reports for one file."""

    size: int
    etag: str | None = None  # ADLS: the service's; locally: inode, mtime and size
    content_md5: bytes | None = None  # ADLS: set by our flush; None locally


class StagingFile(ABC):
    """A file being written; `write` receives blocks of the sink's block size."""

    relpath: str

    @abstractmethod
    def write(self, block: bytes, /) -> None:
        """Store every byte of `block` (after the bytes already written) or raise."""

    @abstractmethod
    def close(self) -> int:
        """Make everything written durable in staging (fsync / flush_data) and return the
        size the store holds. Idempotent: a second call returns the same size."""


class Sink(ABC):
    root_uri: str

    @abstractmethod
    def open_staging(self, run_id: str, relpath: str, content_type: str) -> StagingFile:
        """A new staging file that will be published onto `relpath`."""

    @abstractmethod
    def publish(
        self,
        staging: StagingFile,
        relpath: str,
        *,
        expected_size: int,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> Published:
        """Close `staging` if needed, check it holds exactly `expected_size` bytes (else raise
        `SizeMismatch`, publishing nothing), then atomically move it onto `relpath`,
        replacing what was there. Raises `SinkError` with the destination untouched, or
        `PublishUncertain` when the outcome could not be established.

        Conditional, for commit points: with `if_match` only if the destination still has
        that etag (`stat(relpath).etag`), with `if_none_match` only if there is none; else
        `PreconditionFailed` and nothing is published. The check and the rename are one
        operation (a conditional rename on ADLS, a lock around both locally), so a writer
        that lost its lock can never overwrite what another writer committed since."""

    @abstractmethod
    def discard(self, staging: StagingFile) -> None:
        """Delete a staging file after a failure; bounded, never raises."""

    @abstractmethod
    def delete(self, relpath: str) -> None:
        """Delete a published file; a missing file is not an error."""

    @abstractmethod
    def stat(self, relpath: str) -> FileInfo | None:
        """The file at `relpath` as the store reports it, or None if there is none."""

    @abstractmethod
    def read_bytes(self, relpath: str) -> bytes:
        """The whole file, for small files (manifests); FileNotFoundError if missing."""

    @abstractmethod
    def open_read(self, relpath: str) -> Iterator[bytes]:
        """The file as a stream of chunks, in bounded memory whatever its size. Opening is
        eager: a missing file raises FileNotFoundError here, not at the first chunk."""

    @abstractmethod
    def list_files(self, prefix: str = "") -> list[str]:
        """Relative paths of every file under `prefix`, staging included."""

    @abstractmethod
    def staging_files(self) -> list[tuple[str, float | None]]:
        """Every file in `_staging/` with the time the store last modified it (epoch
        seconds; None if the store does not say), in one listing."""

    @abstractmethod
    def _remove_staging_dir(self) -> None:
        """Remove `_staging` if it is empty; another writer's file keeps it."""

    def sweep_staging(self, older_than_s: float, keep_runs: Collection[str] = ()) -> list[str]:
        """Delete the staging files the store last modified more than `older_than_s` seconds
        ago (leftovers of killed runs) and return their relative paths. A file without a
        known time, or younger, is kept: another run may still be writing it; so is every
        file of the runs in `keep_runs` (runs known to be alive: on ADLS a file's time moves
        only when it is created and flushed, so a long upload looks old). One listing of
        `_staging/`; raises `SinkError` when the listing fails or, after trying every old
        file, naming those that could not be deleted."""
        cutoff = time.time() - older_than_s
        alive = tuple(f"{STAGING_DIR}/{run_id}-" for run_id in keep_runs)
        removed: list[str] = []
        failed: list[str] = []
        for rel, modified in sorted(self.staging_files()):
            if modified is None or modified >= cutoff or rel.startswith(alive):
                continue  # young, of unknown age, or of a live run: it may be being written
            try:
                self.delete(rel)  # a file published or discarded meanwhile is no error
            except Exception as e:
                failed.append(f"{rel} ({e})")
                continue
            removed.append(rel)
        self._remove_staging_dir()
        if failed:
            raise SinkError(
                f"removed {len(removed)} old staging file(s), but could not remove "
                f"{len(failed)}: " + "; ".join(failed)
            )
        return removed

    def uri(self, relpath: str) -> str:
        return f"{self.root_uri.rstrip('/')}/{relpath}"

    def write_bytes(
        self,
        run_id: str,
        relpath: str,
        data: bytes,
        content_type: str,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> Published:
        """Stage and publish a small file (manifests) with the same protocol as data."""
        staging = self.open_staging(run_id, relpath, content_type)
        try:
            staging.write(data)
            return self.publish(
                staging, relpath, expected_size=len(data), if_match=if_match,
                if_none_match=if_none_match,
            )  # fmt: skip
        except BaseException:
            self.discard(staging)  # touches only the staging path, whatever happened
            raise


def precondition_failed(
    relpath: str, if_match: str | None, found: str | None
) -> PreconditionFailed:
    expected = f"etag {if_match}" if if_match else "no file"
    now = f"etag {found}" if found else "no file"
    return PreconditionFailed(
        f"not publishing {relpath}: expected {expected} there, found {now} (another writer "
        "committed it meanwhile); nothing was published"
    )


def size_mismatch(relpath: str, staging: str, staged: int, expected: int) -> SizeMismatch:
    return SizeMismatch(
        f"refusing to publish {relpath}: its staging file {staging} holds {staged:,} bytes "
        f"but {expected:,} were written to it (a short write); nothing was published"
    )

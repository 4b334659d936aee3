"""The contract every Bronze sink keeps: stage, then publish by rename.

A sink writes a new file under `_staging/`, which no reader looks at, and only
when the whole stream is safely stored does `publish` rename it onto its final path in one
server-side (or filesystem) operation that replaces the previous version. `discard` removes
a staging file after a failure. The local filesystem and ADLS Gen2 both have an atomic
rename, so the same protocol gives the same guarantee on both.
"""

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

STAGING_DIR = "_staging"


def staging_relpath(run_id: str, relpath: str) -> str:
    """`_staging/<run_id>-<token>-<file name>`: flat, so that cleaning up after a writer
    never means deleting a folder another writer of the same run is still using."""
    return f"{STAGING_DIR}/{run_id}-{uuid.uuid4().hex[:8]}-{relpath.rsplit('/', 1)[-1]}"


@dataclass(frozen=True)
class FileInfo:
    size: int
    etag: str | None = None


@dataclass(frozen=True)
class Published:
    uri: str
    size: int
    etag: str | None = None


class StagingFile(ABC):
    """A file being written; `write` receives blocks of the sink's block size."""

    relpath: str

    @abstractmethod
    def write(self, block: bytes, /) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Make everything written durable in staging (fsync / flush_data)."""


class Sink(ABC):
    root_uri: str

    @abstractmethod
    def open_staging(self, run_id: str, relpath: str, content_type: str) -> StagingFile: ...

    @abstractmethod
    def publish(self, staging: StagingFile, relpath: str, *, expected_size: int) -> Published:
        """Atomically move a closed staging file onto `relpath`, replacing what was there,
        once its size is `expected_size`."""

    @abstractmethod
    def stat(self, relpath: str) -> FileInfo | None: ...

    @abstractmethod
    def discard(self, staging: StagingFile) -> None:
        """Delete a staging file after a failure; never raises for a missing file."""

    @abstractmethod
    def delete(self, relpath: str) -> None:
        """Delete a published file; a missing file is not an error."""

    @abstractmethod
    def read_bytes(self, relpath: str) -> bytes: ...

    @abstractmethod
    def list_files(self, prefix: str = "") -> list[str]:
        """Relative paths of every file under `prefix`, staging included."""

    def uri(self, relpath: str) -> str:
        return f"{self.root_uri.rstrip('/')}/{relpath}"

    def write_bytes(self, run_id: str, relpath: str, data: bytes, content_type: str) -> Published:
        """Stage and publish a small file (manifests) with the same protocol as data."""
        staging = self.open_staging(run_id, relpath, content_type)
        try:
            staging.write(data)
            return self.publish(staging, relpath, expected_size=len(data))
        except BaseException:
            self.discard(staging)
            raise

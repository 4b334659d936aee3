"""Bronze on a local (or mounted) filesystem: the embedded default and the test reference.

Durability follows the usual recipe for atomic replacement on POSIX: write the staging file,
fsync it, `os.replace` it over the target, fsync the directory.
"""

import os
from pathlib import Path

from pg_assets.sinks.base import FileInfo, Published, Sink, StagingFile, staging_relpath


class LocalStagingFile(StagingFile):
    def __init__(self, path: Path, relpath: str) -> None:
        self.path = path
        self.relpath = relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "wb", buffering=0)  # blocks are already large  # noqa: SIM115

    def write(self, block: bytes, /) -> None:
        self._f.write(block)

    def close(self) -> None:
        if not self._f.closed:
            os.fsync(self._f.fileno())
            self._f.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalSink(Sink):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root_uri = self.root.as_uri()

    def _path(self, relpath: str) -> Path:
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"path {relpath!r} escapes the Bronze root {self.root}")
        return path

    def open_staging(self, run_id: str, relpath: str, content_type: str) -> LocalStagingFile:
        rel = staging_relpath(run_id, relpath)
        return LocalStagingFile(self._path(rel), rel)

    def publish(self, staging: StagingFile, relpath: str, *, expected_size: int) -> Published:
        assert isinstance(staging, LocalStagingFile)
        staging.close()
        size = staging.path.stat().st_size
        if size != expected_size:
            raise OSError(f"staged {relpath} holds {size} bytes, expected {expected_size}")
        target = self._path(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging.path, target)
        _fsync_dir(target.parent)
        return Published(uri=self.uri(relpath), size=target.stat().st_size)

    def discard(self, staging: StagingFile) -> None:
        assert isinstance(staging, LocalStagingFile)
        try:
            staging._f.close()
        finally:
            staging.path.unlink(missing_ok=True)

    def stat(self, relpath: str) -> FileInfo | None:
        try:
            return FileInfo(self._path(relpath).stat().st_size)
        except FileNotFoundError:
            return None

    def delete(self, relpath: str) -> None:
        self._path(relpath).unlink(missing_ok=True)

    def read_bytes(self, relpath: str) -> bytes:
        return self._path(relpath).read_bytes()

    def list_files(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

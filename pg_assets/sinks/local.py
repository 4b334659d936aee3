"""Bronze on a local (or mounted) filesystem: the embedded default and the test reference.

Durability follows the usual recipe for atomic replacement on POSIX: write the staging file,
fsync it, `os.replace` it over the target, fsync the directory.

Writes go straight to the file descriptor and loop until every byte is written: `write(2)`
may store fewer bytes than asked (a file size limit, a signal, some network filesystems)
and the next call then reports the error (EFBIG, ENOSPC). `close` returns the size the
filesystem reports after fsync, and `publish` refuses a staging file whose size is not the
number of bytes the caller produced.
"""

import errno
import fcntl
import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pg_assets.sinks.base import (
    READ_CHUNK,
    STAGING_DIR,
    FileInfo,
    Published,
    Sink,
    SinkError,
    StagingFile,
    precondition_failed,
    size_mismatch,
    staging_relpath,
)

LOCKS_DIR = "_locks"  # beside _staging; never read: 256 lock stripes for conditional renames
_CAS_WAIT_S = 30.0

_LOCK_TIMEOUT_S = 30.0  # discard waits this long for a write in progress on another thread


class LocalStagingFile(StagingFile):
    def __init__(self, path: Path, relpath: str) -> None:
        self.path = path
        self.relpath = relpath
        self.written = 0
        self._size: int | None = None
        # serialises write and close/discard: the writer runs in the stream's worker thread,
        # and closing a descriptor under a concurrent write could let the number be reused
        self._lock = threading.Lock()
        for attempt in range(3):  # another publish may remove the empty staging dir meanwhile
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise

    def write(self, block: bytes, /) -> None:
        with self._lock:
            if self._fd is None:
                raise SinkError(f"staging file {self.relpath} is already closed")
            view = memoryview(block)
            while view:
                n = os.write(self._fd, view)
                if n <= 0:  # not an error for write(2), but no progress either
                    raise OSError(errno.EIO, f"write to {self.path} stored no bytes")
                view = view[n:]
                self.written += n

    def close(self) -> int:
        with self._lock:
            if self._size is None:
                if self._fd is None:
                    raise SinkError(f"staging file {self.relpath} was discarded")
                fd, self._fd = self._fd, None
                try:
                    os.fsync(fd)
                    self._size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
            return self._size

    def _abandon(self) -> None:
        """Close without fsync (discard); never waits for a stuck write for long."""
        if not self._lock.acquire(timeout=_LOCK_TIMEOUT_S):
            return  # a write is stuck in the kernel: leak the descriptor rather than race it
        try:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
        finally:
            self._lock.release()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing the parent of each directory created so the path survives a crash."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


def _token(st: os.stat_result) -> str:
    """A local etag: a commit renames a new file into place, so inode and mtime change."""
    return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'


def _read_chunks(f: BinaryIO, chunk: int) -> Iterator[bytes]:
    with f:
        while data := f.read(chunk):
            yield data


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class LocalSink(Sink):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root_uri = self.root.as_uri()

    def _path(self, relpath: str) -> Path:
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"path {relpath!r} escapes the Bronze root {self.root}")
        return path

    def _remove_staging_dir(self) -> None:
        """Remove `_staging` once it is empty; another writer's file keeps it (ENOTEMPTY)."""
        try:
            os.rmdir(self.root / STAGING_DIR)
        except OSError:
            pass

    def open_staging(self, run_id: str, relpath: str, content_type: str) -> LocalStagingFile:
        rel = staging_relpath(run_id, relpath)
        return LocalStagingFile(self._path(rel), rel)

    @contextmanager
    def _target_lock(self, relpath: str) -> Iterator[None]:
        """An exclusive flock held around a conditional check-and-rename of `relpath`, so it is
        one operation for every writer on this filesystem; waits at most _CAS_WAIT_S."""
        locks = self.root / LOCKS_DIR
        locks.mkdir(exist_ok=True)
        name = hashlib.sha1(relpath.encode()).hexdigest()[:2]  # 256 stripes, not a file per target
        fd = os.open(locks / name, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            deadline = time.monotonic() + _CAS_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SinkError(
                            f"another writer held the commit lock of {relpath} for "
                            f"{_CAS_WAIT_S:g} s"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the flock

    def publish(
        self,
        staging: StagingFile,
        relpath: str,
        *,
        expected_size: int,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> Published:
        assert isinstance(staging, LocalStagingFile)
        staged = staging.close()
        if staged != expected_size:
            raise size_mismatch(relpath, staging.relpath, staged, expected_size)
        target = self._path(relpath)
        _makedirs_durable(target.parent)
        conditional = if_match is not None or if_none_match
        with self._target_lock(relpath) if conditional else _nothing():
            if conditional:
                held = self.stat(relpath)
                found = held.etag if held else None
                if (if_none_match and held is not None) or (
                    if_match is not None and found != if_match
                ):
                    raise precondition_failed(relpath, if_match, found)
            os.replace(staging.path, target)
            _fsync_dir(target.parent)
            etag = _token(target.stat())
        self._remove_staging_dir()
        return Published(uri=self.uri(relpath), size=staged, etag=etag)

    def discard(self, staging: StagingFile) -> None:
        assert isinstance(staging, LocalStagingFile)
        try:
            staging._abandon()
            staging.path.unlink(missing_ok=True)
        except OSError:
            pass
        self._remove_staging_dir()

    def delete(self, relpath: str) -> None:
        path = self._path(relpath)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)  # a removed superseded file must not come back after a crash

    def stat(self, relpath: str) -> FileInfo | None:
        try:
            st = self._path(relpath).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return FileInfo(size=st.st_size, etag=_token(st)) if stat.S_ISREG(st.st_mode) else None

    def read_bytes(self, relpath: str) -> bytes:
        return self._path(relpath).read_bytes()

    def open_read(self, relpath: str) -> Iterator[bytes]:
        return _read_chunks(open(self._path(relpath), "rb"), READ_CHUNK)  # noqa: SIM115

    def list_files(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            rel
            for p in base.rglob("*")
            if p.is_file()
            and not (rel := str(p.relative_to(self.root))).startswith(LOCKS_DIR + "/")
        )

    def staging_files(self) -> list[tuple[str, float | None]]:
        # every write moves a file's mtime: its age is the time since its writer last wrote
        staging = self.root / STAGING_DIR
        found: list[tuple[str, float | None]] = []
        try:
            entries = list(os.scandir(staging))
        except FileNotFoundError:
            return found
        except OSError as e:
            raise SinkError(f"could not list {staging}: {e}") from e
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # published or discarded meanwhile
            if stat.S_ISREG(st.st_mode):
                found.append((f"{STAGING_DIR}/{entry.name}", st.st_mtime))
        return found

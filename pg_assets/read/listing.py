"""Which days of a table are committed, found the only trustworthy way: through manifests.

A day is committed when `date=YYYY-MM-DD/_manifest.json` exists; its data is the one file the
manifest names (`file`), nothing else in the folder. A failed run can leave a data file with
no manifest (or beside a manifest that names another file) until the next run of that day
removes it, so a reader that globs data files can read rows that were never committed.

A day can be republished while it is read (a late-data re-materialization): its commit
deletes the superseded file right after replacing the manifest, so a manifest read a moment
earlier may name a file that is gone. `open_day` then reads the day's manifest again and
opens the file it names now, once; a day republished again meanwhile is a `ReadError`.
"""

import datetime as dt
import hashlib
import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pg_assets.core.identifiers import QualifiedName, parse_qualified_name
from pg_assets.core.layout import MANIFEST, table_folder
from pg_assets.sinks.base import Sink

CHUNK = 1 << 20
_DAY_MANIFEST = re.compile(r"date=(\d{4}-\d\d-\d\d)/" + re.escape(MANIFEST))


class ReadError(RuntimeError):
    """Bronze cannot be read as asked; the message names the table, the day and the file."""


@dataclass(frozen=True)
class CommittedDay:
    """One committed day: its manifest and the relative path of the one data file it names."""

    table: str  # the quoted display name, as in errors
    day: dt.date
    data: str  # relpath of the data file under the Bronze root
    uri: str  # the data file's full URI (file:///… or abfss://…), for Spark or DuckDB
    manifest: Mapping[str, Any]

    @property
    def columns(self) -> list[dict[str, str]]:
        return list(self.manifest["columns"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def codec(self) -> str:
        return str(self.manifest.get("codec", "gzip"))

    @property
    def where(self) -> str:
        return f"table {self.table}, day {self.day.isoformat()}, file {self.data}"


def open_root(root: str, adls: Mapping[str, Any] | None = None) -> Sink:
    """The sink for a Bronze root: `abfss://…` (with `adls` = the `bronze.adls` settings:
    auth, secret_env, endpoint, …) or a local path / file:// URI."""
    if root.startswith("abfss://"):
        from pg_assets.sinks.adls import AdlsSink

        settings = dict(adls or {})
        settings.pop("create_filesystem", None)  # a reader never creates anything
        settings.pop("queue_depth", None)
        return AdlsSink.from_uri(root, **settings)
    from pg_assets.sinks.local import LocalSink

    return LocalSink(root.removeprefix("file://"))


def as_sink(bronze: str | Sink, adls: Mapping[str, Any] | None = None) -> Sink:
    return bronze if isinstance(bronze, Sink) else open_root(bronze, adls)


def as_table(table: str | QualifiedName) -> QualifiedName:
    return table if isinstance(table, QualifiedName) else parse_qualified_name(table)


def as_day(value: dt.date | str | None) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(value)


def committed_days(
    bronze: str | Sink,
    source: str,
    table: str | QualifiedName,
    *,
    start: dt.date | str | None = None,
    end: dt.date | str | None = None,
    verify: bool = False,
    adls: Mapping[str, Any] | None = None,
) -> list[CommittedDay]:
    """Committed days of `table` in [start, end] (inclusive, ISO dates), oldest first.

    `verify=True` also reads every data file and checks its size and sha256 against its
    manifest (a full read of the range; the typed reader checks the row count on every read
    anyway, and gzip/zstd check their own checksums).
    """
    sink = as_sink(bronze, adls)
    name = as_table(table)
    first, last = as_day(start), as_day(end)
    folder = table_folder(source, name)
    days = []
    for rel in sink.list_files(folder):
        m = _DAY_MANIFEST.fullmatch(rel.removeprefix(f"{folder}/"))
        if not m:  # a data file (committed or not), or anything else: not a day
            continue
        day = dt.date.fromisoformat(m[1])
        if (first and day < first) or (last and day > last):
            continue
        days.append(_committed(sink, name, day, rel))
    days.sort(key=lambda d: d.day)
    if verify:
        days = [verify_day(sink, d) for d in days]
    return days


def _committed(sink: Sink, name: QualifiedName | str, day: dt.date, rel: str) -> CommittedDay:
    where = f"table {name}, day {day.isoformat()}"
    try:
        manifest = json.loads(sink.read_bytes(rel))
    except FileNotFoundError:
        raise ReadError(f"{where}: its manifest {rel} is gone (the day was deleted)") from None
    except ValueError as e:
        raise ReadError(f"{where}: manifest {rel} is not JSON: {e}") from None
    file = manifest.get("file")
    if file is None and manifest.get("uri"):  # layout v1 manifests name their file by URI
        file = str(manifest["uri"]).rsplit("/", 1)[-1]
    if not file or "/" in file or manifest.get("partition", day.isoformat()) != day.isoformat():
        raise ReadError(f"{where}: manifest {rel} does not describe a data file of this day")
    if "columns" not in manifest or "rows" not in manifest:
        raise ReadError(f"{where}: manifest {rel} has no columns/rows")
    data = f"{rel.rsplit('/', 1)[0]}/{file}"
    return CommittedDay(str(name), day, data, sink.uri(data), manifest)


def open_day(sink: Sink, day: CommittedDay) -> tuple[CommittedDay, Iterator[bytes]]:
    """The day's data file, opened: the day as read from its manifest, or, if that file is
    gone because the day was republished since, the day as its manifest says now (read once
    more) with that version's file. Bounded: a second miss is a `ReadError` naming the day."""
    try:
        return day, sink.open_read(day.data)
    except FileNotFoundError:
        pass
    manifest = f"{day.data.rsplit('/', 1)[0]}/{MANIFEST}"
    fresh = _committed(sink, day.table, day.day, manifest)
    where = f"table {day.table}, day {day.day.isoformat()}"
    if fresh.data == day.data:
        raise ReadError(
            f"{where}: its manifest names {day.data}, which the store does not hold (deleted?)"
        )
    try:
        return fresh, sink.open_read(fresh.data)
    except FileNotFoundError:
        raise ReadError(
            f"{where}: its data file {day.data} was replaced while the table was read, and "
            f"the file its manifest names now, {fresh.data}, is gone too (republished again "
            "meanwhile, or deleted); read it again"
        ) from None


def verify_day(sink: Sink, day: CommittedDay) -> CommittedDay:
    """Check the day's data file against its manifest; returns the day as verified (its
    current version, if it was republished since `day` was read)."""
    day, chunks = open_day(sink, day)
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    check_digest(day, digest.hexdigest(), size)
    return day


def check_digest(day: CommittedDay, sha256: str, size: int) -> None:
    expected = (day.manifest.get("sha256"), day.manifest.get("compressed_bytes"))
    if (sha256, size) != expected:
        raise ReadError(
            f"{day.where}: holds {size} bytes with sha256 {sha256}, but its manifest says "
            f"{expected[1]} bytes with sha256 {expected[0]}"
        )


class DecompressedStream(io.RawIOBase):
    """A file object over a data file's decompressed bytes, pulled chunk by chunk from the
    store: what `pyarrow.csv.open_csv` reads, so a day is never whole in memory. It hashes
    the compressed bytes as they pass, for `verify`."""

    def __init__(self, chunks: Iterable[bytes], codec: str, where: str) -> None:
        self._chunks = iter(chunks)
        self._codec = codec
        self._where = where
        self._d = self._decompressor()
        self._pending = b""  # compressed input not yet decompressed
        self._out = memoryview(b"")
        self._done = False
        self.sha256 = hashlib.sha256()
        self.size = 0

    def _decompressor(self) -> Any:
        if self._codec == "gzip":
            return zlib.decompressobj(47)
        if self._codec == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().decompressobj()
        if self._codec == "none":
            return None
        raise ReadError(f"{self._where}: unknown codec {self._codec!r}")

    def readable(self) -> bool:
        return True

    def _fill(self) -> bytes:
        """The next piece of decompressed data; b"" at the end of the file."""
        while True:
            if not self._pending:
                chunk = next(self._chunks, None)
                if chunk is None:
                    if self._d is not None and not self._ended():
                        raise ReadError(f"{self._where}: the compressed file is truncated")
                    return b""
                self.sha256.update(chunk)
                self.size += len(chunk)
                if self._d is None:
                    return chunk
                self._pending = chunk
            if self._ended():  # a new member/frame follows the one that ended
                self._d = self._decompressor()
            if self._codec == "gzip":
                out = self._d.decompress(self._pending, CHUNK)
                self._pending = self._d.unconsumed_tail or (
                    self._d.unused_data if self._d.eof else b""
                )
            else:
                out = self._d.decompress(self._pending)
                self._pending = self._d.unused_data if self._d.eof else b""
            if out:
                return out

    def _ended(self) -> bool:
        return bool(self._d.eof)

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            try:
                piece = self._fill()
            except (zlib.error, ValueError) as e:
                if isinstance(e, ReadError):
                    raise
                raise ReadError(f"{self._where}: the compressed file is corrupt: {e}") from e
            except FileNotFoundError as e:  # a stream in chunks (ADLS) lost its file
                raise ReadError(
                    f"{self._where}: the file was deleted while it was read (the day was "
                    f"republished); read it again: {e}"
                ) from e
            except Exception as e:
                if type(e).__name__ == "ZstdError":
                    raise ReadError(f"{self._where}: the compressed file is corrupt: {e}") from e
                raise
            if not piece:
                return 0
            self._out = memoryview(piece)
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

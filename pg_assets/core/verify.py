"""Proof that a day in Bronze is still what PostgreSQL holds: pure functions, no Dagster.

Three questions, each answered as cheaply as it can be answered exactly:

- **Is the published file intact?** `read_back` streams the day's data file from the sink,
  hashes the compressed bytes (sha256 must equal the manifest's), decompresses them and counts
  CSV records (rows must equal the manifest's). Records, not lines: a quoted field may hold
  newlines, so a newline ends a record only outside quotes (PostgreSQL's CSV doubles quotes
  inside quoted fields, so quote parity tells inside from outside). Memory is bounded by the
  chunk size whatever the day's size. For very large days a byte budget stops after the first
  N bytes and the result says which part was checked.
- **Does PostgreSQL still hold the same day?** `count_day` counts the day on the relation and
  bounds of the day's current plan (`pg_assets.core.planner.plan_day`), optionally with an
  order-independent content hash computed in SQL, so nothing but two numbers crosses the wire.
- **Did any day change?** `recount_window` counts (and optionally hashes) many days in one
  grouped query on the parent: `WHERE col >= lo AND col < hi` prunes to the window's
  partitions, `GROUP BY` the day in the table's time zone. It reads the parent, so it sees rows
  in any child and in the DEFAULT partition.

- **Does the day folder hold anything else?** `find_leftovers` lists the folder: a run killed
  between publishing its data file and committing the manifest, or between the commit and
  removing the superseded version, leaves a second data file that glob readers would read too.
  Files of a run still in progress (it holds the day's lock) are not leftovers.

`schema_diff` compares the columns of two manifests.
"""

import csv
import datetime as dt
import hashlib
import io
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from isal import isal_zlib
from psycopg import sql

from pg_assets.core.layout import MANIFEST, PartitionPaths
from pg_assets.core.planner import CopyPlan, TableInfo, day_bounds
from pg_assets.core.publish import read_manifest

# Order-independent: a sum of per-row 64-bit hashes (as numeric, so it never overflows).
# ROW(...)::text depends on the session settings that shape text output, which every
# pg_assets connection pins (`pg_assets.core.session`), so extraction and check agree.
CONTENT_HASH_ALGORITHM = "sum(hashtextextended(ROW(<columns in manifest order>)::text, 0))"
READ_CHUNK = 1 << 20  # how much is fed to the hash and decompressor at a time
_MAX_OUT = 16 << 20  # decompressed bytes produced per call: bounds memory on any input
_QUOTE, _NEWLINE = ord('"'), ord("\n")


# -- CSV records ----------------------------------------------------------------------------


class CsvRecordCounter:
    """Counts records of PostgreSQL CSV fed in arbitrary pieces.

    A record ends at a newline outside quotes. Inside a quoted field a quote is written as
    `""`, which flips the parity twice, so the parity of quotes seen so far tells whether a
    newline is inside a field. Vectorised with numpy (positions of quotes and newlines, then
    a binary search): a few hundred MB/s on one core, where a Python loop over bytes manages
    a few MB/s.
    """

    HEAD_MAX = 1 << 20  # a header longer than this is not kept (it is still counted)

    def __init__(self) -> None:
        self.records = 0
        self.in_quotes = False
        self.last_byte: int | None = None
        self.bytes = 0
        self._head = bytearray()  # the start of the data, until the first record has ended

    def feed(self, data: bytes) -> None:
        n = len(data)
        if not n:
            return
        if self.records == 0 and len(self._head) < self.HEAD_MAX:
            self._head += data[: self.HEAD_MAX - len(self._head)]
        self.bytes += n
        self.last_byte = data[-1]
        if b'"' not in data:
            if not self.in_quotes:
                self.records += data.count(b"\n")
            return
        a = np.frombuffer(data, np.uint8)
        quotes = np.flatnonzero(a == _QUOTE)
        newlines = np.flatnonzero(a == _NEWLINE)
        # a newline is outside quotes when the quotes before it (in this piece, plus the
        # state carried in) are even in number
        before = np.searchsorted(quotes, newlines) + int(self.in_quotes)
        self.records += len(newlines) - int(np.count_nonzero(before & 1))
        self.in_quotes = bool((len(quotes) + int(self.in_quotes)) & 1)

    def first_record(self) -> list[str] | None:
        """The first record's fields (the header), once it has been read whole."""
        if self.records == 0:
            return None
        rows = csv.reader(io.StringIO(bytes(self._head).decode("utf-8", "replace"), newline=""))
        return next(rows, None)

    @property
    def complete(self) -> bool:
        """The input ended at a record boundary: outside quotes, after a newline."""
        return not self.in_quotes and self.last_byte in (None, _NEWLINE)


# -- Decompression ------------------------------------------------------------------------


class _Decompressor:
    """A streaming decompressor with the zlib object API, bounded output per call."""

    def __init__(self, codec: str) -> None:
        self.codec = codec
        if codec == "gzip":
            self._d: Any = isal_zlib.decompressobj(31)  # a single gzip member, as we write it
        elif codec == "zstd":
            import zstandard

            self._d = zstandard.ZstdDecompressor().decompressobj()
        elif codec == "none":
            self._d = None
        else:
            raise ValueError(f"unknown codec {codec!r}")

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._d is None:
            yield data
            return
        if self.codec == "zstd":  # no max_length: feed slices so the output stays bounded
            for i in range(0, len(data), 64 << 10):
                out = self._d.decompress(data[i : i + (64 << 10)])
                if out:
                    yield out
            return
        buf = data
        while buf:
            out = self._d.decompress(buf, _MAX_OUT)
            if out:
                yield out
            buf = self._d.unconsumed_tail
            if self._d.eof:
                return

    def finish(self) -> Iterator[bytes]:
        if self._d is None or self.codec == "zstd":
            return
        while not self._d.eof:
            out = self._d.decompress(b"", _MAX_OUT)
            if not out:
                break
            yield out

    @property
    def eof(self) -> bool:
        return True if self._d is None else bool(self._d.eof)

    @property
    def trailing(self) -> int:
        """Bytes after the end of the compressed stream (there must be none)."""
        return 0 if self._d is None else len(self._d.unused_data)


# -- Read-back ------------------------------------------------------------------------------


@dataclass
class ReadBack:
    """What reading a day's file back found. `problems` is empty when everything checked
    matched; `complete` says whether the whole file was checked (else only `bytes_read`)."""

    file: str
    problems: list[str] = field(default_factory=list)
    expected_bytes: int = 0
    size_in_store: int | None = None
    bytes_read: int = 0
    raw_bytes: int = 0
    rows: int | None = None  # records minus the header, when the whole file was read
    records_seen: int = 0
    expected_rows: int = 0
    sha256: str | None = None
    complete: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds else 0.0

    def part_checked(self) -> str:
        if self.complete:
            return f"the whole file ({self.bytes_read:,} bytes)"
        pct = 100 * self.bytes_read / self.expected_bytes if self.expected_bytes else 0
        return (
            f"the first {self.bytes_read:,} of {self.expected_bytes:,} bytes ({pct:.1f}%): "
            f"{self.records_seen:,} complete records decompressed cleanly; sha256 and row "
            "count not verified beyond them"
        )

    def summary(self) -> str:
        if self.problems:
            return f"{self.file}: " + "; ".join(self.problems)
        if self.complete:
            return (
                f"{self.file}: sha256 and {self.rows:,} rows match the manifest "
                f"({self.bytes_read:,} bytes read back)"
            )
        return f"{self.file}: checked {self.part_checked()}"


def verify_stream(
    chunks: Iterable[bytes],
    *,
    file: str,
    codec: str,
    sha256: str,
    compressed_bytes: int,
    rows: int,
    byte_budget: int | None = None,
    size_in_store: int | None = None,
    columns: Sequence[str] | None = None,
) -> ReadBack:
    """Check a stream of a data file's bytes against what its manifest recorded.

    With `byte_budget`, stops after that many bytes: what was read must decompress cleanly
    and hold no more records than the manifest's rows; the full sha256 and the row count are
    then not verified, and the result says so. With `columns`, the CSV header must name them.
    """
    started = time.perf_counter()
    result = ReadBack(
        file=file, expected_bytes=compressed_bytes, expected_rows=rows, size_in_store=size_in_store
    )
    sha = hashlib.sha256()
    decomp = _Decompressor(codec)
    counter = CsvRecordCounter()
    cut = False
    error: str | None = None
    iterator = iter(chunks)
    try:
        for chunk in iterator:
            if byte_budget is not None and result.bytes_read + len(chunk) > byte_budget:
                chunk = chunk[: byte_budget - result.bytes_read]
                cut = True
            for i in range(0, len(chunk), READ_CHUNK):
                piece = chunk[i : i + READ_CHUNK]
                sha.update(piece)
                if error is None:
                    offset = result.bytes_read
                    try:
                        for out in decomp.feed(piece):
                            result.raw_bytes += len(out)
                            counter.feed(out)
                    except Exception as e:  # zlib.error, zstd.ZstdError: corrupt input
                        error = (
                            f"{codec} decompression failed in compressed bytes "
                            f"{offset:,}..{offset + len(piece):,}: {e}"
                        )
                result.bytes_read += len(piece)
            if cut:
                break
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # releases the download / file handle when stopped early
    if error is None and not cut:
        try:
            for out in decomp.finish():
                result.raw_bytes += len(out)
                counter.feed(out)
        except Exception as e:
            error = f"{codec} decompression failed at the end of the file: {e}"
    result.records_seen = counter.records
    result.complete = not cut
    p = result.problems
    if size_in_store is not None and size_in_store != compressed_bytes:
        what = "truncated" if size_in_store < compressed_bytes else "longer than published"
        p.append(
            f"{what}: the store holds {size_in_store:,} bytes, the manifest recorded "
            f"{compressed_bytes:,}"
        )
    if error:
        p.append(error)
    header = counter.first_record()
    if columns is not None and header is not None and header != list(columns):
        p.append(
            f"the CSV header names columns {', '.join(header)}; the manifest lists "
            f"{', '.join(columns)}"
        )
    if cut:
        if counter.records - 1 > rows:
            p.append(
                f"{counter.records - 1:,} rows in the first {result.bytes_read:,} bytes, more "
                f"than the {rows:,} the manifest recorded for the whole file"
            )
    else:
        result.sha256 = sha.hexdigest()
        if result.bytes_read != compressed_bytes and size_in_store is None:
            p.append(
                f"read {result.bytes_read:,} bytes, the manifest recorded {compressed_bytes:,}"
            )
        if result.sha256 != sha256:
            p.append(f"sha256 mismatch: read {result.sha256}, the manifest recorded {sha256}")
        if error is None:
            if not decomp.eof:
                p.append(f"the {codec} stream ends early (truncated data)")
            elif decomp.trailing:
                p.append(f"{decomp.trailing:,} bytes after the end of the {codec} stream")
            if not counter.complete:
                p.append("the CSV ends inside a record (no final newline or an open quote)")
            result.rows = counter.records - 1  # the header
            if result.rows != rows:
                p.append(f"{max(result.rows, 0):,} rows read back, the manifest recorded {rows:,}")
    result.seconds = time.perf_counter() - started
    return result


def _chunks_from(sink: Any, relpath: str) -> Iterator[bytes]:
    """The file as chunks: `Sink.open_read` (streamed, bounded memory) where the sink has it;
    otherwise the whole file from `read_bytes`, cut into chunks."""
    open_read: Callable[[str], Iterable[bytes]] | None = getattr(sink, "open_read", None)
    if open_read is not None:
        yield from open_read(relpath)
        return
    data = memoryview(sink.read_bytes(relpath))
    for i in range(0, len(data), READ_CHUNK):
        yield bytes(data[i : i + READ_CHUNK])


def read_back(
    sink: Any, folder: str, manifest: Mapping[str, Any], *, byte_budget: int | None = None
) -> ReadBack:
    """Read the data file `manifest` names (in `folder`) back from `sink` and verify it."""
    rel = f"{folder}/{manifest['file']}"
    expected = int(manifest["compressed_bytes"])
    info = sink.stat(rel)
    if info is None:
        r = ReadBack(file=rel, expected_bytes=expected, expected_rows=int(manifest["rows"]))
        r.problems.append(
            "missing: the manifest names this file but the store does not hold it (deleted?)"
        )
        return r
    try:
        return verify_stream(
            _chunks_from(sink, rel),
            file=rel,
            codec=str(manifest["codec"]),
            sha256=str(manifest["sha256"]),
            compressed_bytes=expected,
            rows=int(manifest["rows"]),
            byte_budget=byte_budget,
            size_in_store=info.size,
            columns=[c["name"] for c in manifest.get("columns", [])] or None,
        )
    except FileNotFoundError:
        r = ReadBack(file=rel, expected_bytes=expected, expected_rows=int(manifest["rows"]))
        r.problems.append("missing: the file disappeared while it was read")
        return r


# -- Leftovers ------------------------------------------------------------------------------


def manifest_file(manifest: Mapping[str, Any]) -> str | None:
    """The name of the data file a manifest commits (layout v1 names it by URI only)."""
    file = manifest.get("file")
    if file is None and manifest.get("uri"):
        file = str(manifest["uri"]).rsplit("/", 1)[-1]
    return str(file) if file else None


@dataclass(frozen=True)
class Leftovers:
    """Files of a day folder besides its manifest and the data file the manifest names."""

    files: list[str]  # relative paths, left by runs that ended (flag them)
    in_progress: str | None = None  # who holds the day's lock: `files` may be its own
    data_files: list[str] = field(default_factory=list)  # of `files`: pg_assets data versions

    @property
    def flagged(self) -> bool:
        return bool(self.files) and self.in_progress is None


def unnamed(files: Iterable[str], folder: str, manifest: Mapping[str, Any] | None) -> list[str]:
    """Of a day folder's `files`, those that are neither its manifest nor the file it names."""
    keep = {f"{folder}/{MANIFEST}"}
    if manifest is not None and (file := manifest_file(manifest)):
        keep.add(f"{folder}/{file}")
    return [f for f in files if f not in keep]


def other_files(sink: Any, folder: str, manifest: Mapping[str, Any] | None) -> list[str]:
    return unnamed(sink.list_files(folder), folder, manifest)


def find_leftovers(
    sink: Any,
    paths: PartitionPaths,
    manifest: Mapping[str, Any],
    lock_holder: Callable[[], str | None],
) -> Leftovers:
    """The files of the day folder that `manifest` does not name and no run in progress owns.

    A run publishes its data file before it commits the manifest, and removes the superseded
    file after: while it holds the day's lock (`lock_holder()` says who, or None), a second
    file is expected, not a leftover. Once no run holds it, the folder is listed again against
    the manifest as it is then: only files present both times are reported (a run that ended
    between the two listings took its own file away, or committed it)."""
    first = other_files(sink, paths.folder, manifest)
    if not first:
        return Leftovers([])
    holder = lock_holder()
    if holder is not None:
        return Leftovers(first, in_progress=holder)
    current = read_manifest(sink, paths.manifest) or manifest  # read before listing again
    again = set(other_files(sink, paths.folder, current))
    files = [f for f in first if f in again]
    return Leftovers(files, data_files=[f for f in files if paths.is_data_file(f)])


# -- Counting in PostgreSQL -----------------------------------------------------------------


@dataclass(frozen=True)
class DayCount:
    rows: int
    content_hash: str | None  # the sum as decimal text; None when not asked for


def _row_hash(columns: Sequence[str]) -> sql.Composed:
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    # ROW() of one column is still a row (a one-field composite), never a bare value
    return sql.SQL("hashtextextended(ROW({})::text, 0)").format(cols)


def count_statement(plan: CopyPlan, column: str, columns: Sequence[str] | None) -> sql.Composed:
    """`SELECT count(*)[, sum(row hash)]` over exactly what `plan`'s COPY reads: the same
    relation and bounds. `columns` (names, in the manifest's order) adds the content hash;
    they are listed explicitly because an attached child may store them in another order."""
    hashed = sql.SQL(", sum({})::text").format(_row_hash(columns)) if columns else sql.SQL(", NULL")
    return sql.SQL(
        "SELECT count(*){hashed} FROM {rel} WHERE {pcol} >= {lo} AND {pcol} < {hi}"
    ).format(
        hashed=hashed,
        rel=plan.relation.identifier,
        pcol=sql.Identifier(column),
        lo=sql.Literal(plan.lower),
        hi=sql.Literal(plan.upper),
    )


def count_day(
    conn: psycopg.Connection, plan: CopyPlan, column: str, columns: Sequence[str] | None = None
) -> DayCount:
    """Count (and hash, with `columns`) the day `plan` reads, in the caller's transaction."""
    row = conn.execute(count_statement(plan, column, columns)).fetchone()
    assert row is not None
    total = row[1] if row[1] is not None else ("0" if columns else None)
    return DayCount(int(row[0]), total)


def content_hash_record(count: DayCount) -> dict[str, Any]:
    """The manifest's `content_hash` entry: over the manifest's `columns`, in their order."""
    return {"algorithm": CONTENT_HASH_ALGORITHM, "value": count.content_hash or "0"}


def _day_expr(info: TableInfo, timezone: str) -> sql.Composed:
    col = sql.Identifier(info.partition_column.name)
    if info.kind == "date":
        return sql.SQL("{}").format(col)
    if info.kind == "timestamp":
        return sql.SQL("{}::date").format(col)
    return sql.SQL("({} AT TIME ZONE {})::date").format(col, sql.Literal(timezone))


def window_statement(
    info: TableInfo,
    timezone: str,
    first: dt.date,
    last: dt.date,
    columns: Sequence[str] | None = None,
) -> sql.Composed:
    """One grouped query counting every day of [first, last] on the parent. The bounds are
    literals of the column's own type, so the planner prunes to the window's partitions."""
    lo, _ = day_bounds(info.kind, first, timezone)
    _, hi = day_bounds(info.kind, last, timezone)
    hashed = sql.SQL(", sum({})::text").format(_row_hash(columns)) if columns else sql.SQL(", NULL")
    pcol = sql.Identifier(info.partition_column.name)
    return sql.SQL(
        "SELECT {day} AS day, count(*){hashed} FROM {rel} "
        "WHERE {pcol} >= {lo} AND {pcol} < {hi} GROUP BY 1"
    ).format(
        day=_day_expr(info, timezone),
        hashed=hashed,
        rel=info.name.identifier,
        pcol=pcol,
        lo=sql.Literal(lo),
        hi=sql.Literal(hi),
    )


def recount_window(
    conn: psycopg.Connection,
    info: TableInfo,
    timezone: str,
    first: dt.date,
    last: dt.date,
    columns: Sequence[str] | None = None,
) -> dict[dt.date, DayCount]:
    """Rows (and content hash, with `columns`) of every day in [first, last] that has rows;
    a day missing from the result has none."""
    out: dict[dt.date, DayCount] = {}
    for day, rows, total in conn.execute(window_statement(info, timezone, first, last, columns)):
        out[day] = DayCount(int(rows), total)
    return out


# -- Schema -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaDiff:
    added: tuple[tuple[str, str], ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    retyped: tuple[tuple[str, str, str], ...] = ()  # name, before, after
    reordered: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.added or self.dropped or self.retyped or self.reordered)

    def describe(self) -> str:
        parts = []
        if self.added:
            parts.append("added " + ", ".join(f"{n} ({t})" for n, t in self.added))
        if self.dropped:
            parts.append("dropped " + ", ".join(f"{n} ({t})" for n, t in self.dropped))
        if self.retyped:
            parts.append("retyped " + ", ".join(f"{n} ({a} → {b})" for n, a, b in self.retyped))
        if self.reordered:
            parts.append("columns reordered")
        return "; ".join(parts) if parts else "no change"


def schema_diff(
    before: Sequence[Mapping[str, str]], after: Sequence[Mapping[str, str]]
) -> SchemaDiff:
    """Columns added, dropped and retyped between two manifests' `columns` lists."""
    b = {c["name"]: c["type"] for c in before}
    a = {c["name"]: c["type"] for c in after}
    common = [n for n in a if n in b]
    return SchemaDiff(
        added=tuple((n, t) for n, t in a.items() if n not in b),
        dropped=tuple((n, t) for n, t in b.items() if n not in a),
        retyped=tuple((n, b[n], a[n]) for n in common if a[n] != b[n]),
        reordered=[n for n in b if n in a] != common,
    )

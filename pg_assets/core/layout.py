"""The Bronze layout contract: where each partition's data and manifest live.

    <root>/<source>/<S>.<T>/date=YYYY-MM-DD/<T>-YYYY-MM-DD-<version>.csv<ext>   data (immutable)
    <root>/<source>/<S>.<T>/date=YYYY-MM-DD/_manifest.json                      the commit point
    <root>/<source>/<S>.<T>/incremental/<T>-<batch:06d>-<n>.csv<ext>            incremental batch
    <root>/<source>/<S>.<T>/incremental/<T>-<batch:06d>.json                    its commit point
    <root>/<source>/<S>.<T>/cdc/<T>-<start>-<end>-<token>[-<part>].csv<ext>    CDC change files
    <root>/<source>/<S>.<T>/cdc/<T>-snapshot-<lsn>-<token>.csv<ext>             CDC snapshot
    <root>/<source>/<S>.<T>/cdc/<T>-snapshot-<lsn>.json                         its commit point
    <root>/<source>/_cdc/<slot>/<start>.json                                    CDC commit points
    <root>/<source>/_cdc/<slot>/_head.json                                      CDC position cache
    <root>/_staging/<run_id>-<token>-<file>                                     never read

`<S>` and `<T>` are the schema and table names, each encoded by `encode_segment` so that the
mapping from tables to folders is injective (`"public.a".b` and `public."a.b"` get different
folders) and no name can leave its folder (`/`, a leading `.`). Everything a PostgreSQL name
may hold that a path, a glob, a Hive partition reader or a Hadoop `Path` would misread becomes
`~XX` (the UTF-8 bytes in hex); letters (non-ASCII included), digits, space and `_-$` stay
readable. Not `%XX`: the Azure SDK un-quotes a rename's source path once more than it quotes
it, so a literal `%2E` in a name would rename the wrong file.

Data files are versioned: each extraction writes a new name, and the manifest, replaced
atomically and last, names the one current file. Readers that trust manifests never see a
manifest describing another file; glob readers see one data file per day once a run has
ended, because publishing removes every other data file of the day (superseded versions,
files of another codec). See `pg_assets.core.extract` for the protocol.
"""

import datetime as dt
import hashlib
import re
import uuid
from dataclasses import dataclass

from pg_assets.core.identifiers import QualifiedName

MANIFEST = "_manifest.json"
_ENCODE = re.compile(r'[~%/\\.:=*?\[\]{}"<>|#\x00-\x1f\x7f]')
_VERSION = re.compile(r"^(\d{8}T\d{6})(\d{6})?Z-([0-9a-f]{8})$")


def encode_segment(text: str) -> str:
    """Encode what a path segment must not hold as `~XX`; reversible by `decode_segment`."""
    return _ENCODE.sub(lambda m: "".join(f"~{b:02X}" for b in m.group().encode()), text)


def decode_segment(text: str) -> str:
    return re.sub(
        r"(?:~[0-9A-F]{2})+",
        lambda m: bytes.fromhex(m.group().replace("~", "")).decode(),
        text,
    )


def table_folder(source: str, table: QualifiedName) -> str:
    return f"{source}/{encode_segment(table.schema)}.{encode_segment(table.name)}"


def new_version(now: dt.datetime | None = None) -> str:
    """`YYYYMMDDTHHMMSSffffffZ-<8 hex>`: the extraction's start to the microsecond, then a
    token; sorts by extraction time (`version_key`), unique per extraction."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def version_key(version: str) -> str:
    """A key that orders versions by time (versions written before microseconds sort as
    their second's start)."""
    m = _VERSION.match(version)
    if not m:
        raise ValueError(f"not a data file version: {version!r}")
    return f"{m.group(1)}{m.group(2) or '000000'}-{m.group(3)}"


@dataclass(frozen=True)
class PartitionPaths:
    """The folder of one day and the names inside it."""

    folder: str
    stem: str  # every data file of the day starts with it: `<T>-YYYY-MM-DD`

    @property
    def manifest(self) -> str:
        return f"{self.folder}/{MANIFEST}"

    def data(self, version: str, extension: str) -> str:
        return f"{self.folder}/{self.stem}-{version}.csv{extension}"

    def version_of(self, relpath: str) -> str | None:
        """The version of one of this day's data files (None for layout v1's unversioned)."""
        name = relpath.rpartition("/")[2]
        version = name[len(self.stem) + 1 :].partition(".csv")[0]
        return version if _VERSION.match(version) else None

    def is_data_file(self, relpath: str) -> bool:
        """A data file of this day, of any version or codec (layout v1's unversioned name too)."""
        folder, _, name = relpath.rpartition("/")
        if folder != self.folder or not name.startswith(self.stem):
            return False
        rest = name[len(self.stem) :]
        if rest.startswith(".csv"):
            return True  # v1: <T>-YYYY-MM-DD.csv<ext>
        version, dot, _ = rest.removeprefix("-").partition(".csv")
        return rest.startswith("-") and bool(dot) and bool(_VERSION.match(version))


def daily_paths(source: str, table: QualifiedName, day: dt.date) -> PartitionPaths:
    return PartitionPaths(
        folder=f"{table_folder(source, table)}/date={day.isoformat()}",
        stem=f"{encode_segment(table.name)}-{day.isoformat()}",
    )


_BATCH = re.compile(r"^(\d{6,})\.json$")
_BATCH_DATA = re.compile(r"^(\d{6,})-(\d+)\.csv")


@dataclass(frozen=True)
class IncrementalPaths:
    """The folder of an incremental table's batches and the names inside it.

    A batch's manifest is named after the batch number alone: it is the commit point, written
    create-only, so a batch commits once. Its data file is `<T>-<batch:06d>-<n>.csv<ext>`, `n`
    the lowest version no other attempt of the batch holds (published create-only too): an
    attempt never overwrites another's file, and the few names an attempt could have used are
    found without listing a folder that grows forever (see `pg_assets.core.incremental`)."""

    folder: str
    stem: str  # `<T>`: every batch file starts with `<T>-<batch:06d>`

    def data(self, batch: int, version: int, extension: str) -> str:
        return f"{self.folder}/{self.stem}-{batch:06d}-{version}.csv{extension}"

    def version_of(self, relpath: str) -> tuple[int, int] | None:
        """(batch, version) of a data file of this folder, else None (layout v1's unversioned
        `<T>-<batch:06d>.csv<ext>` included)."""
        folder, _, name = relpath.rpartition("/")
        if folder != self.folder or not name.startswith(f"{self.stem}-"):
            return None
        m = _BATCH_DATA.match(name[len(self.stem) + 1 :])
        return (int(m.group(1)), int(m.group(2))) if m else None

    def manifest(self, batch: int) -> str:
        return f"{self.folder}/{self.stem}-{batch:06d}.json"

    def batch_of_manifest(self, relpath: str) -> int | None:
        """The batch number of a manifest path of this folder, else None."""
        folder, _, name = relpath.rpartition("/")
        if folder != self.folder or not name.startswith(f"{self.stem}-"):
            return None
        m = _BATCH.match(name[len(self.stem) + 1 :])
        return int(m.group(1)) if m else None


def incremental_paths(source: str, table: QualifiedName) -> IncrementalPaths:
    return IncrementalPaths(
        folder=f"{table_folder(source, table)}/incremental", stem=encode_segment(table.name)
    )


# -- change data capture (issue 12; see pg_assets.core.cdc.batch for the protocol) ----------

CDC_HEAD = "_head.json"


def _hex(lsn: int) -> str:
    return f"{lsn:016X}"  # zero-padded upper-case hex: names sort in LSN order


def cdc_folder(source: str, table: QualifiedName) -> str:
    return f"{table_folder(source, table)}/cdc"


def cdc_change_file(
    source: str,
    table: QualifiedName,
    start: int,
    end: int,
    token: str,
    part: int,
    extension: str,
) -> str:
    """A batch's change file of one table: `<T>-<start>-<end>-<token>.csv<ext>`, `-<part>`
    appended for the second and later files of the table in the batch (after a schema change).
    `token` (8 hex digits) is the attempt's: two runs that read the same range of the slot (one
    of them had lost the slot's lock) never write, nor delete, each other's files."""
    suffix = f"-{part}" if part else ""
    name = encode_segment(table.name)
    return (
        f"{cdc_folder(source, table)}/{name}-{_hex(start)}-{_hex(end)}-{token}{suffix}"
        f".csv{extension}"
    )


def cdc_snapshot_file(
    source: str, table: QualifiedName, lsn: int, run_id: str, extension: str
) -> str:
    """The table's full extract at the slot position `lsn`: changes committed at or after
    `lsn` apply to it. `-<token>` (8 hex digits of the run's id) keeps two runs that got the
    same consistent point (one of them had lost the source's lock) off each other's file;
    only one of them commits the manifest, which is create-only."""
    token = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    name = f"{encode_segment(table.name)}-snapshot-{_hex(lsn)}-{token}.csv{extension}"
    return f"{cdc_folder(source, table)}/{name}"


def cdc_snapshot_manifest(source: str, table: QualifiedName, lsn: int) -> str:
    return f"{cdc_folder(source, table)}/{encode_segment(table.name)}-snapshot-{_hex(lsn)}.json"


def cdc_journal(source: str, slot: str) -> str:
    """The folder of a slot's batch manifests (the commit points) and its `_head.json`."""
    return f"{source}/_cdc/{slot}"


def cdc_batch_manifest(source: str, slot: str, start: int) -> str:
    """The commit point of the batch that starts at slot position `start`: named by its start
    alone and written create-only, so only one batch from a position can ever commit."""
    return f"{cdc_journal(source, slot)}/{_hex(start)}.json"


def cdc_head(source: str, slot: str) -> str:
    return f"{cdc_journal(source, slot)}/{CDC_HEAD}"

"""The Bronze layout contract: where each partition's data and manifest live.

    <root>/<source>/<S>.<T>/date=YYYY-MM-DD/<T>-YYYY-MM-DD-<version>.csv<ext>   data (immutable)
    <root>/<source>/<S>.<T>/date=YYYY-MM-DD/_manifest.json                      the commit point
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
import re
import uuid
from dataclasses import dataclass

from pg_assets.core.identifiers import QualifiedName

MANIFEST = "_manifest.json"
_ENCODE = re.compile(r'[~%/\\.:=*?\[\]{}"<>|#\x00-\x1f\x7f]')
_VERSION = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


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
    """`YYYYMMDDTHHMMSSZ-<8 hex>`: sorts by extraction time, unique per extraction."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


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

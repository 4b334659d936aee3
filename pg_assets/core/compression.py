"""Streaming codecs for Bronze files.

gzip is the default because every reader (Spark, Databricks Auto Loader, pandas, DuckDB,
`zcat`) opens `.csv.gz` without configuration. Levels 0-3 use ISA-L (python-isal), whose
level 1 compresses several times faster than zlib's at a similar ratio and releases the GIL,
so it overlaps the COPY read in another thread (see bench/ for the numbers). Levels 4-9 fall
back to zlib for users who want smaller files at higher cost. zstd is offered for readers
that support it: better ratio per CPU second, also GIL-free.
"""

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from isal import isal_zlib


class Compressor(Protocol):
    def compress(self, data: bytes | bytearray | memoryview, /) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes | bytearray | memoryview, /) -> bytes:
        return bytes(data)

    def flush(self) -> bytes:
        return b""


class _Zstd:
    def __init__(self, level: int) -> None:
        import zstandard

        self._c = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, data: bytes | bytearray | memoryview, /) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


def _gzip(level: int) -> Compressor:
    if level <= isal_zlib.ISAL_BEST_COMPRESSION:
        return isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)
    return zlib.compressobj(level, zlib.DEFLATED, 31)


def _zstd_decompress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


@dataclass(frozen=True)
class Codec:
    name: str
    extension: str
    content_type: str
    levels: range
    default_level: int
    make: Callable[[int], Compressor]
    decompress: Callable[[bytes], bytes]

    def compressor(self, level: int | None = None) -> Compressor:
        level = self.default_level if level is None else level
        if level not in self.levels:
            raise ValueError(
                f"level {level} is not valid for codec {self.name} "
                f"({self.levels.start}..{self.levels.stop - 1})"
            )
        return self.make(level)


CODECS: dict[str, Codec] = {
    "gzip": Codec(
        "gzip", ".gz", "application/gzip", range(0, 10), 1, _gzip, lambda b: zlib.decompress(b, 47)
    ),
    "zstd": Codec("zstd", ".zst", "application/zstd", range(1, 23), 3, _Zstd, _zstd_decompress),
    "none": Codec("none", "", "text/csv", range(0, 1), 0, lambda _: _Identity(), bytes),
}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None

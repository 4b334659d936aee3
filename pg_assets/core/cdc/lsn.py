"""Log sequence numbers in the two text forms pg_assets uses.

PostgreSQL prints an LSN as `X/Y` (two hex halves, no padding), which neither sorts as text
nor fits a file name well; file names and the change files' `_commit_lsn`/`_lsn` columns use
the 64-bit value as 16 upper-case hex digits, so that names and values sort in LSN order as
plain strings in any reader (a lake listing, Spark, DuckDB) without a cast.
"""

import re

_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_HEX = re.compile(r"[0-9A-F]{16}")
MAX_LSN = (1 << 64) - 1


def parse_lsn(text: str) -> int:
    """`'16/B374D848'` → 0x16B374D848, as PostgreSQL's pg_lsn input reads it."""
    m = _LSN.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not an LSN (expected X/Y in hex, e.g. 16/B374D848)")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    """The `X/Y` text PostgreSQL prints for a pg_lsn (and accepts back)."""
    if not 0 <= lsn <= MAX_LSN:
        raise ValueError(f"LSN {lsn} out of range")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_hex(lsn: int) -> str:
    """16 zero-padded upper-case hex digits: sorts as text in LSN order."""
    if not 0 <= lsn <= MAX_LSN:
        raise ValueError(f"LSN {lsn} out of range")
    return f"{lsn:016X}"


def parse_lsn_hex(text: str) -> int:
    """Inverse of `lsn_hex`; strict, so a file name that merely looks similar is rejected."""
    if not _HEX.fullmatch(text):
        raise ValueError(f"{text!r} is not a 16-digit upper-case hex LSN")
    return int(text, 16)

"""PostgreSQL types (as `format_type()` prints them in the manifest) → Arrow types, and the
parsers that turn PostgreSQL's COPY text into those types exactly.

Every data file is PostgreSQL's own text output in a pinned session (DateStyle ISO, TimeZone
UTC, IntervalStyle postgres, bytea_output hex, extra_float_digits 1; the manifest's `session`
records it), so each type has one text form to parse. The rule is: exact or an error naming the
column, the day and the value, never a silent approximation. Where Arrow has no exact type the
column stays PostgreSQL's text:

    smallint, integer, bigint        int16, int32, int64
    numeric(p,s)                     decimal128(p,s) for p <= 38, decimal256(p,s) for p <= 76;
                                     NaN/Infinity in such a column raise (read it as text)
    numeric (no typmod), p > 76      string: unconstrained numeric has no fixed scale
    real, double precision           float32, float64 (NaN, ±Infinity included)
    boolean                          bool
    date                             date32
    timestamp(n) [with time zone]    timestamp[us] / timestamp[us, UTC]: PostgreSQL keeps
                                     microseconds whatever n is
    ±infinity (date, timestamps)     the extreme values DuckDB uses for ±infinity: date32
                                     ±(2**31 - 1), timestamp ±(2**63 - 1); DuckDB shows them
                                     as infinity, `is_infinity` tells them apart in Python
    time(n)                          time64[us] ('24:00:00' is 86 400 000 000 µs)
    time with time zone, interval    string: Arrow has no type holding an offset with a time,
                                     nor months + days + µs as PostgreSQL adds them
    bytea                            binary
    uuid                             string (canonical lower-case form, as PostgreSQL prints
                                     it: readable everywhere, unlike fixed_size_binary(16))
    json, jsonb                      string (PostgreSQL's own text; jsonb is normalised by it)
    T[]                              list<T's type> for one-dimensional arrays with default
                                     bounds; a multi-dimensional value raises (read as text)
    anything else                    string (text, varchar, char(n) with its padding, enums,
                                     domains, money, inet, ranges, …)
"""

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
TIMESTAMP_INFINITY = INT64_MAX  # DuckDB's timestamp 'infinity'
TIMESTAMP_NEG_INFINITY = -INT64_MAX  # DuckDB's '-infinity' (INT64_MIN is pandas' NaT)
DATE_INFINITY = INT32_MAX
DATE_NEG_INFINITY = -INT32_MAX
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


class ParseError(ValueError):
    """A value that is not the text its column's type prints, or has no exact form in the
    column's Arrow type; the message says which value."""


Converter = Callable[[pa.Array], pa.Array]


@dataclass(frozen=True)
class ColumnType:
    """How one PostgreSQL type is read: its Arrow type and the parser of its text form."""

    pg_type: str
    arrow: pa.DataType
    convert: Converter  # string array (nulls = SQL NULL) → array of `arrow`


# -- scalar parsers (the exceptional values the vectorised casts refuse) --------------------

_DATE = re.compile(r"^(\d{4,})-(\d\d)-(\d\d)( BC)?$")
_TS = re.compile(
    r"^(\d{4,})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?"
    r"(?:([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?)?( BC)?$"
)
_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?$")


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar, any (astronomical) year
    (H. Hinnant's algorithm): Python's date stops at year 1 and 9999, PostgreSQL does not."""
    y -= m <= 2
    era = y // 400  # floor division: C's (y - 399) / 400 for negative years
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _year(text: str, bc: str | None) -> int:
    return 1 - int(text) if bc else int(text)  # 1 BC is year 0, 2 BC is year -1


def parse_date(text: str) -> int:
    """PostgreSQL ISO date text → days since the epoch (±infinity → DuckDB's sentinels)."""
    if text == "infinity":
        return DATE_INFINITY
    if text == "-infinity":
        return DATE_NEG_INFINITY
    m = _DATE.match(text)
    if not m:
        raise ParseError(f"{text!r} is not a PostgreSQL ISO date")
    return _days_from_civil(_year(m[1], m[4]), int(m[2]), int(m[3]))


def parse_timestamp(text: str) -> int:
    """PostgreSQL ISO timestamp(tz) text → microseconds since the epoch, in UTC when the text
    carries an offset (±infinity → DuckDB's sentinels)."""
    if text == "infinity":
        return TIMESTAMP_INFINITY
    if text == "-infinity":
        return TIMESTAMP_NEG_INFINITY
    m = _TS.match(text)
    if not m:
        raise ParseError(f"{text!r} is not a PostgreSQL ISO timestamp")
    days = _days_from_civil(_year(m[1], m[12]), int(m[2]), int(m[3]))
    seconds = days * 86400 + int(m[4]) * 3600 + int(m[5]) * 60 + int(m[6])
    if m[8]:
        offset = int(m[9]) * 3600 + int(m[10] or 0) * 60 + int(m[11] or 0)
        seconds -= offset if m[8] == "+" else -offset
    micros = seconds * 1_000_000 + int((m[7] or "").ljust(6, "0"))
    if not -INT64_MAX < micros < INT64_MAX:
        raise ParseError(f"{text!r} is beyond Arrow's timestamp[us] range")
    return micros


def parse_time(text: str) -> int:
    m = _TIME.match(text)
    if not m:
        raise ParseError(f"{text!r} is not a PostgreSQL time")
    seconds = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
    return seconds * 1_000_000 + int((m[4] or "").ljust(6, "0"))


def parse_bytea(text: str) -> bytes:
    if not text.startswith("\\x"):
        raise ParseError(f"{text[:20]!r} is not bytea in hex output (bytea_output=hex)")
    return bytes.fromhex(text[2:])


_ELEMENT = re.compile(r'"((?:[^"\\]|\\.)*)"|([^",{}]*)', re.S)
_UNESCAPE = re.compile(r"\\(.)", re.S)


def parse_array(text: str) -> list[str | None]:
    """A one-dimensional PostgreSQL array literal → its elements as text (None for NULL).

    PostgreSQL's array output quotes an element when it is empty, is `NULL` in any case, or
    holds a delimiter, brace, quote, backslash or white space; inside quotes `"` and `\\`
    are backslash-escaped. An unquoted NULL is SQL NULL, a quoted "NULL" is the text NULL.
    """
    if not (text.startswith("{") and text.endswith("}")):
        if text.startswith("["):
            raise ParseError(
                f"{text[:40]!r}: an array with explicit bounds ([lo:hi]={{...}}) has no list "
                "form; read the column as text"
            )
        raise ParseError(f"{text[:40]!r} is not a PostgreSQL array literal")
    inner = text[1:-1]
    if not inner:
        return []
    if '"' not in inner and "{" not in inner:  # nothing quoted: split (the common case)
        return [None if item == "NULL" else item for item in inner.split(",")]
    out: list[str | None] = []
    i, n = 0, len(inner)
    while True:
        m = _ELEMENT.match(inner, i)
        assert m is not None  # the pattern matches the empty string
        quoted, plain = m.groups()
        if quoted is not None:
            out.append(_UNESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted)
        elif inner.startswith("{", i):
            raise ParseError(
                f"{text[:40]!r}: a multi-dimensional array has no list<...> form; read the "
                "column as text"
            )
        else:
            out.append(None if plain == "NULL" else plain)
        i = m.end()
        if i == n:
            return out
        if inner[i] != ",":
            raise ParseError(f"{text[:40]!r}: unexpected {inner[i]!r} at position {i + 1}")
        i += 1


# -- column converters ----------------------------------------------------------------------


def _per_value(fn: Callable[[str], object], arrow: pa.DataType) -> Converter:
    def convert(arr: pa.Array) -> pa.Array:
        return pa.array([None if v is None else fn(v) for v in arr.to_pylist()], arrow)

    return convert


def _cast_or(fallback: Callable[[str], int], arrow: pa.DataType, storage: pa.DataType) -> Converter:
    """Arrow's vectorised cast for the ordinary values; the exact scalar parser for a batch
    that holds anything it refuses (infinity, BC, years past 9999)."""

    def convert(arr: pa.Array) -> pa.Array:
        try:
            return pc.cast(arr, arrow)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = [None if v is None else fallback(v) for v in arr.to_pylist()]
            return pa.array(values, storage).view(arrow)

    return convert


def _bool(arr: pa.Array) -> pa.Array:
    ok = pc.all(pc.is_in(arr.drop_null(), pa.array(["t", "f"]))).as_py()
    if ok is False:
        bad = pc.filter(arr, pc.invert(pc.is_in(arr, pa.array(["t", "f"])))).drop_null()
        raise ParseError(f"{bad[0].as_py()!r} is not a PostgreSQL boolean ('t' or 'f')")
    return pc.equal(arr, "t")


def _decimal(arrow: pa.DataType) -> Converter:
    def convert(arr: pa.Array) -> pa.Array:
        try:
            return pc.cast(arr, arrow)
        except pa.ArrowInvalid:
            for v in arr.drop_null().to_pylist():
                try:
                    pc.cast(pa.array([v]), arrow)
                except pa.ArrowInvalid:
                    raise ParseError(f"numeric value {v!r} has no {arrow} form") from None
            raise

    return convert


def _list(element: ColumnType) -> Converter:
    def convert(arr: pa.Array) -> pa.Array:
        offsets = [0]
        flat: list[str | None] = []
        mask = []
        for v in arr.to_pylist():
            if v is not None:
                flat.extend(parse_array(v))
            offsets.append(len(flat))
            mask.append(v is None)
        values = element.convert(pa.array(flat, pa.string()))
        return pa.ListArray.from_arrays(
            pa.array(offsets, pa.int32()), values, mask=pa.array(mask, pa.bool_())
        )

    return convert


def _identity(arr: pa.Array) -> pa.Array:
    return arr


_SIMPLE: dict[str, pa.DataType] = {
    "smallint": pa.int16(),
    "integer": pa.int32(),
    "bigint": pa.int64(),
    "real": pa.float32(),
    "double precision": pa.float64(),
}
_NUMERIC = re.compile(r"^numeric\((\d+),(-?\d+)\)$")
_TIMESTAMP = re.compile(r"^timestamp(?:\(\d\))? with(out)? time zone$")
_TIME_TYPE = re.compile(r"^time(?:\(\d\))? without time zone$")


def column_type(pg_type: str) -> ColumnType:
    """The Arrow type and parser for a PostgreSQL type as `format_type()` prints it."""
    if pg_type.endswith("[]"):
        element = column_type(pg_type[:-2])
        return ColumnType(pg_type, pa.list_(element.arrow), _list(element))
    if pg_type in _SIMPLE:
        arrow = _SIMPLE[pg_type]
        return ColumnType(pg_type, arrow, lambda a, t=arrow: pc.cast(a, t))
    if m := _NUMERIC.match(pg_type):
        precision, scale = int(m[1]), int(m[2])
        if 0 <= scale <= precision <= 76:
            arrow = pa.decimal128(precision, scale) if precision <= 38 else None
            arrow = arrow or pa.decimal256(precision, scale)
            return ColumnType(pg_type, arrow, _decimal(arrow))
    if pg_type == "boolean":
        return ColumnType(pg_type, pa.bool_(), _bool)
    if pg_type == "date":
        return ColumnType(pg_type, pa.date32(), _cast_or(parse_date, pa.date32(), pa.int32()))
    if m := _TIMESTAMP.match(pg_type):
        arrow = pa.timestamp("us") if m[1] else pa.timestamp("us", "UTC")
        return ColumnType(pg_type, arrow, _cast_or(parse_timestamp, arrow, pa.int64()))
    if _TIME_TYPE.match(pg_type):
        arrow = pa.time64("us")
        return ColumnType(pg_type, arrow, _time(arrow))
    if pg_type == "bytea":
        return ColumnType(pg_type, pa.binary(), _per_value(parse_bytea, pa.binary()))
    return ColumnType(pg_type, pa.string(), _identity)


def _time(arrow: pa.DataType) -> Converter:
    def convert(arr: pa.Array) -> pa.Array:
        values = [None if v is None else parse_time(v) for v in arr.to_pylist()]
        return pa.array(values, pa.int64()).view(arrow)

    return convert


def text_type(pg_type: str) -> ColumnType:
    """A column read as PostgreSQL's text, whatever its type (`as_text=`)."""
    return ColumnType(pg_type, pa.string(), _identity)


def is_infinity(value: object) -> bool:
    """Whether a value read from a date/timestamp column is one of the ±infinity sentinels
    (as Python objects they show as far-future/far-past dates, or overflow)."""
    if isinstance(value, pa.Scalar):
        value = value.cast(pa.int64() if pa.types.is_timestamp(value.type) else pa.int32())
        value = value.as_py()
    return value in (TIMESTAMP_INFINITY, TIMESTAMP_NEG_INFINITY, DATE_INFINITY, DATE_NEG_INFINITY)

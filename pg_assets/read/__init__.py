"""Read Bronze back with PostgreSQL's types: `pg_assets.read` (no Dagster needed).

    from pg_assets import read
    days = read.committed_days(root, "demo", "public.orders", start="2026-11-01")
    table = read.read_table(root, "demo", "public.orders", start="2026-11-01", end="2026-11-03")
    for batch in read.read_batches(root, "demo", "public.orders"):   # bounded memory
        ...
    rel = read.duckdb_relation(root, "demo", "public.orders")        # a DuckDB relation

`root` is the Bronze root (a local path, or `abfss://…` with `adls={...}`, the `bronze.adls`
settings of the config file) or a `Sink`. Only committed days are read (a manifest exists),
and of each only the file its manifest names. Columns get Arrow types from the manifest's
PostgreSQL types (see `pg_assets.read.types` for the mapping and what stays text), plus a
`date` column holding the day. Each day is streamed from the store through the decompressor
into Arrow's CSV reader in blocks, so `read_batches` holds one block of one day at a time.
Every day's row count is checked against its manifest; `verify=True` also checks the data
file's size and sha256 (before a day's last batch is handed out).
"""

import datetime as dt
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from pg_assets.core.identifiers import QualifiedName
from pg_assets.read.listing import (
    CommittedDay,
    DecompressedStream,
    ReadError,
    as_sink,
    check_digest,
    committed_days,
    open_day,
    open_root,
)
from pg_assets.read.types import (
    DATE_INFINITY,
    DATE_NEG_INFINITY,
    TIMESTAMP_INFINITY,
    TIMESTAMP_NEG_INFINITY,
    ColumnType,
    ParseError,
    column_type,
    is_infinity,
    text_type,
)
from pg_assets.sinks.base import Sink

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "DATE_INFINITY",
    "DATE_NEG_INFINITY",
    "TIMESTAMP_INFINITY",
    "TIMESTAMP_NEG_INFINITY",
    "CommittedDay",
    "ParseError",
    "ReadError",
    "arrow_schema",
    "column_type",
    "committed_days",
    "duckdb_relation",
    "is_infinity",
    "open_root",
    "read_batches",
    "read_table",
]

BLOCK_SIZE = 4 << 20  # bytes of CSV per Arrow block (one record batch)


def _csv_options(names: Sequence[str], block_size: int) -> tuple[Any, Any, Any]:
    """PostgreSQL's CSV, read exactly: every column as text, an unquoted empty field is NULL
    and a quoted one ("") the empty string, quoted values may hold CR and LF."""
    return (
        pacsv.ReadOptions(block_size=block_size, use_threads=False),
        pacsv.ParseOptions(newlines_in_values=True),
        pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            null_values=[""],
        ),
    )


def _types(
    days: Sequence[CommittedDay], as_text: Collection[str]
) -> tuple[dict[str, ColumnType], str]:
    """Columns across the days (a column added later is NULL on earlier days); the same
    column with two PostgreSQL types is an error naming both days."""
    seen: dict[str, tuple[str, CommittedDay]] = {}
    for d in days:
        for c in d.columns:
            prev = seen.setdefault(c["name"], (c["type"], d))
            if prev[0] != c["type"]:
                raise ReadError(
                    f"table {d.table}: column {c['name']!r} is {prev[0]} on "
                    f"{prev[1].day} but {c['type']} on {d.day}; read the days separately"
                )
    unknown = set(as_text) - set(seen)
    if days and unknown:
        raise ReadError(f"table {days[0].table}: as_text names no column {sorted(unknown)}")
    types = {n: (text_type(t) if n in as_text else column_type(t)) for n, (t, _) in seen.items()}
    return types, (days[0].table if days else "")


def arrow_schema(
    columns: Sequence[Mapping[str, str]], *, as_text: Collection[str] = (), day_column: str = "date"
) -> pa.Schema:
    """The Arrow schema for manifest `columns` ([{name, type}]) plus the day column."""
    fields = [
        pa.field(c["name"], (text_type if c["name"] in as_text else column_type)(c["type"]).arrow)
        for c in columns
    ]
    return pa.schema([*fields, pa.field(day_column, pa.date32(), nullable=False)])


def _day_array(day: dt.date, n: int) -> pa.Array:
    return pa.array(np.full(n, day.toordinal() - dt.date(1970, 1, 1).toordinal(), np.int32)).view(
        pa.date32()
    )


def _read_day(
    sink: Sink,
    day: CommittedDay,
    types: Mapping[str, ColumnType],
    schema: pa.Schema,
    *,
    verify: bool,
    block_size: int,
) -> Iterator[pa.RecordBatch]:
    opened, chunks = open_day(sink, day)
    if opened.columns != day.columns:
        raise ReadError(
            f"{opened.where}: republished with other columns while the table was read "
            f"({[c['name'] for c in opened.columns]}, was {[c['name'] for c in day.columns]}); "
            "read it again"
        )
    if opened is not day:
        _check_session(opened)
    day = opened
    names = [c["name"] for c in day.columns]
    stream = DecompressedStream(chunks, day.codec, day.where)
    try:
        reader = pacsv.open_csv(stream, *_csv_options(names, block_size))
    except pa.ArrowInvalid as e:
        raise ReadError(f"{day.where}: not PostgreSQL CSV: {e}") from e
    if reader.schema.names != names:
        raise ReadError(
            f"{day.where}: the header {reader.schema.names} differs from the manifest's "
            f"columns {names}"
        )
    try:
        yield from _typed_batches(reader, stream, day, names, types, schema, verify=verify)
    finally:
        reader.close()  # also when the consumer stops early: no reader thread left behind


def _typed_batches(
    reader: Any,
    stream: DecompressedStream,
    day: CommittedDay,
    names: list[str],
    types: Mapping[str, ColumnType],
    schema: pa.Schema,
    *,
    verify: bool,
) -> Iterator[pa.RecordBatch]:
    rows = 0
    held: pa.RecordBatch | None = None  # with verify, the last batch waits for the digest
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as e:
            raise ReadError(f"{day.where}: not PostgreSQL CSV: {e}") from e
        rows += batch.num_rows
        columns = []
        for f in list(schema)[:-1]:  # the last field is the day column
            if f.name in names:
                try:
                    columns.append(types[f.name].convert(batch.column(f.name)))
                except (ParseError, pa.ArrowInvalid) as e:
                    raise ReadError(
                        f"{day.where}: column {f.name!r} ({types[f.name].pg_type}): {e}; "
                        f"read it as text with as_text=[{f.name!r}]"
                    ) from e
            else:
                columns.append(pa.nulls(batch.num_rows, f.type))
        columns.append(_day_array(day.day, batch.num_rows))
        out = pa.RecordBatch.from_arrays(columns, schema=schema)
        if verify:
            if held is not None:
                yield held
            held = out
        else:
            yield out
    if rows != day.rows:
        raise ReadError(f"{day.where}: holds {rows} rows, its manifest says {day.rows}")
    if verify:
        check_digest(day, stream.sha256.hexdigest(), stream.size)
        if held is not None:
            yield held


# The settings the parsers rely on (pg_assets pins them on every connection); a manifest
# without `session` predates the record and was written with them too.
_SESSION = {"DateStyle": ("ISO",), "bytea_output": ("hex",), "client_encoding": ("UTF8",)}


def _check_session(day: CommittedDay) -> None:
    session = day.manifest.get("session") or {}
    for setting, allowed in _SESSION.items():
        value = session.get(setting)
        if value is not None and not str(value).startswith(allowed):
            raise ReadError(
                f"{day.where}: written with {setting}={value}, the typed reader reads "
                f"{setting}={allowed[0]} output only; read it with a recipe (text)"
            )


def _plan(
    bronze: str | Sink,
    source: str,
    table: str | QualifiedName,
    start: dt.date | str | None,
    end: dt.date | str | None,
    as_text: Collection[str],
    day_column: str,
    adls: Mapping[str, Any] | None,
) -> tuple[Sink, list[CommittedDay], dict[str, ColumnType], pa.Schema]:
    sink = as_sink(bronze, adls)
    days = committed_days(sink, source, table, start=start, end=end)
    for day in days:
        _check_session(day)
    types, display = _types(days, as_text)
    if day_column in types:
        raise ReadError(
            f"table {display}: has a column named {day_column!r}; pass another day_column="
        )
    fields = [pa.field(n, t.arrow) for n, t in types.items()]
    schema = pa.schema([*fields, pa.field(day_column, pa.date32(), nullable=False)])
    return sink, days, types, schema


def read_batches(
    bronze: str | Sink,
    source: str,
    table: str | QualifiedName,
    *,
    start: dt.date | str | None = None,
    end: dt.date | str | None = None,
    verify: bool = False,
    as_text: Collection[str] = (),
    day_column: str = "date",
    adls: Mapping[str, Any] | None = None,
    block_size: int = BLOCK_SIZE,
) -> pa.RecordBatchReader:
    """The committed days of `table` in [start, end] as a stream of typed record batches,
    day after day, oldest first; memory holds one block (`block_size` bytes of CSV) of one
    day at a time. The schema is known before the first batch (from the manifests)."""
    sink, days, types, schema = _plan(bronze, source, table, start, end, as_text, day_column, adls)

    def batches() -> Iterator[pa.RecordBatch]:
        for day in days:
            yield from _read_day(sink, day, types, schema, verify=verify, block_size=block_size)

    return pa.RecordBatchReader.from_batches(schema, batches())


def read_table(
    bronze: str | Sink,
    source: str,
    table: str | QualifiedName,
    *,
    start: dt.date | str | None = None,
    end: dt.date | str | None = None,
    verify: bool = False,
    as_text: Collection[str] = (),
    day_column: str = "date",
    adls: Mapping[str, Any] | None = None,
) -> pa.Table:
    """The committed days of `table` in [start, end] (inclusive) as one Arrow table."""
    return read_batches(
        bronze, source, table, start=start, end=end, verify=verify, as_text=as_text,
        day_column=day_column, adls=adls,
    ).read_all()  # fmt: skip


def duckdb_relation(
    bronze: str | Sink,
    source: str,
    table: str | QualifiedName,
    *,
    connection: "duckdb.DuckDBPyConnection | None" = None,
    start: dt.date | str | None = None,
    end: dt.date | str | None = None,
    verify: bool = False,
    as_text: Collection[str] = (),
    day_column: str = "date",
    adls: Mapping[str, Any] | None = None,
) -> "duckdb.DuckDBPyRelation":
    """The same rows as a DuckDB relation on `connection` (default: a new in-memory one).

    DuckDB has no 256-bit decimal, so numeric(p,s) with p > 38 reaches it as text; ±infinity
    dates and timestamps show as DuckDB's own infinity. The relation is materialized (an
    Arrow table): query it as often as you like."""
    import duckdb

    data = read_table(
        bronze, source, table, start=start, end=end, verify=verify, as_text=as_text,
        day_column=day_column, adls=adls,
    )  # fmt: skip
    wide = [i for i, f in enumerate(data.schema) if pa.types.is_decimal256(f.type)]
    for i in wide:
        data = data.set_column(i, data.schema[i].name, data.column(i).cast(pa.string()))
    con = connection or duckdb.connect()
    return con.from_arrow(data)

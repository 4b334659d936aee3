"""Change files: the table columns of a change file are byte for byte what COPY writes for
the same rows, and the bookkeeping columns say what happened (op, key change, TOAST,
truncate, schema change, partitions), read from the real server's slot."""

import struct

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.changes import (
    META_COLUMNS,
    ChangeWriter,
    TableKey,
    csv_line,
    pg_timestamptz_text,
    text_array,
)
from pg_assets.core.cdc.lsn import lsn_hex
from pg_assets.core.cdc.pgoutput import Begin, Column, Commit, ProtocolError, Relation
from pg_assets.core.cdc.reader import PINNED_SETTINGS
from pg_assets.core.identifiers import QualifiedName
from pg_assets_tests.cdc_support import (  # noqa: F401
    MemoryFiles,
    cdc_env,
    cdc_names,
    pinned_copy,
    raw_records,
    read,
    wait_flushed,
)

# A reading session whose own settings would change every value's text: the reader must pin.
UNPINNED = (
    "-c TimeZone=Asia/Kolkata -c DateStyle=SQL,DMY -c IntervalStyle=sql_standard"
    " -c extra_float_digits=0 -c bytea_output=escape"
)

TYPES = """
    id int PRIMARY KEY, i bigint, n numeric, n2 numeric(12,3), t text, vc varchar(20),
    ch char(5), j jsonb, js json, arr int[], tarr text[], b bytea, ts timestamptz,
    tsn timestamp, d date, tm time, u uuid, ok bool, f8 float8, f4 real, iv interval,
    ip inet, mon money, mood {mood}, pos {pos}, rng int4range, bits varbit
"""

ROWS = [
    "1, 9223372036854775807, 123456789012345678901234567890.123456789, 1.5, 'plain', 'vc',"
    ' \'ab\', \'{"k": "v, \\"q\\"", "n": [1, 2.50, null]}\', \'{"a" : 1}\', \'{1,NULL,3}\','
    ' \'{"a,b","c\\"d",NULL,""}\', \'\\x00ff0a2c22\', \'2026-03-29 02:30:00 Europe/Berlin\','
    " '2026-11-27 13:14:15.123456', '2026-11-27', '23:59:59.999999',"
    " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, 0.1, 3.4e38, '1 year 2 mons -3 days 04:05:06.789',"
    " '192.168.0.1/24', 1234.56, 'happy', 5, '[1,10)', B'10110'",
    "2, -1, 'NaN', -0.001, 'comma, \"quote\"' || chr(13) || chr(10) || 'crlf' || chr(10) || 'lf',"
    " '', '     ', '\"s\"', '[]', '{}', '{}', '', '-infinity', 'infinity', '4713-01-01 BC',"
    " '00:00', '00000000-0000-0000-0000-000000000000', false, '-0', 'NaN', '-178000000 years',"
    " '::1', -0.01, 'sad', -1, 'empty', B''",
    "3, 0, 'Infinity', 0, 'unicode: é ß 中文 😀 ' || chr(1), '\\.', NULL, '\"\"', 'null', NULL,"
    " '{NULL}', NULL, '1999-12-31 23:59:59.5+14', NULL, NULL, NULL, NULL, NULL, 1e300, 'Infinity',"
    " '0', NULL, NULL, NULL, NULL, '(,)', NULL",
    "4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
    " NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL",
    "5, 1, '1e-20', 12.3456, 'back\\slash \\N \\\\ \\.', '\"', 'x', '\"\\u00e9\"', '\"\\u00e9\"',"
    " '{}', '{\"\\\\\\\\\"}', '\\x5c4e', '2026-11-27 00:00:00.000001+00', '2000-01-01', '0001-01-01',"
    " '12:00:00.1', 'ffffffff-ffff-ffff-ffff-ffffffffffff', true, 1.7976931348623157e308,"
    " 1.17549435e-38, '-1 days -00:00:00.000001', '10.0.0.0/8', 0, 'ok', 0, '(1,2]', B'1'",
]


def _setup(db, s, slot, pub, *tables: str) -> None:
    cdc_slot.ensure_publication(db, pub, [QualifiedName(s, t) for t in tables])
    assert cdc_slot.ensure_slot(db, slot)


def _table_part(record: list[bytes], ncols: int) -> bytes:
    return b",".join(record[len(META_COLUMNS) : len(META_COLUMNS) + ncols]) + b"\n"


def test_inserted_rows_are_byte_identical_to_copy(db, cdc_env):  # noqa: F811
    s, slot, pub = cdc_env
    mood, pos = sql.Identifier(s, "mood"), sql.Identifier(s, "pos")
    db.execute(sql.SQL("CREATE TYPE {} AS ENUM ('happy', 'sad', 'ok')").format(mood))
    db.execute(sql.SQL("CREATE DOMAIN {} AS int CHECK (VALUE > -10)").format(pos))
    t = sql.Identifier(s, "types")
    db.execute(
        sql.SQL("CREATE TABLE {} (" + TYPES + ")").format(t, mood=mood, pos=pos)  # noqa: S608
    )
    _setup(db, s, slot, pub, "types")
    with db.transaction():
        for row in ROWS:
            db.execute(sql.SQL("INSERT INTO {} VALUES (").format(t) + sql.SQL(row + ")"))
    wait_flushed(db)

    with psycopg.connect(db.info.dsn, options=UNPINNED) as reader:
        batch, files = read(reader, slot, pub)
    data = files.data(s, "types")
    records = raw_records(data)
    ncols = len(records[0]) - len(META_COLUMNS) - 2  # _unchanged, _old_id
    expected = pinned_copy(db, sql.SQL("SELECT * FROM {} ORDER BY id").format(t))
    assert b"".join(_table_part(r, ncols) for r in records) == expected
    assert [r[0] for r in records[1:]] == [b"I"] * len(ROWS)
    assert [r[5] for r in records[1:]] == [str(i).encode() for i in range(1, len(ROWS) + 1)]
    assert {r[1] for r in records[1:]} == {lsn_hex(batch.last_commit_lsn or 0).encode()}
    (pg_time,) = db.execute(
        "SELECT set_config('TimeZone', 'UTC', true), ('2000-01-01 00:00:00+00'::timestamptz"
        " + %s * interval '1 microsecond')::text",
        [batch.last_commit_time],
    ).fetchone()[1:]  # type: ignore[index]
    assert {r[4] for r in records[1:]} == {pg_time.encode()}
    assert batch.counts() == {TableKey(s, "types"): {"I": len(ROWS)}}
    # Type messages for user types (a domain is announced as its base type)
    assert set(batch.types.values()) == {f"{s}.mood", "int4"}


def test_csv_dialect_matches_copy_for_awkward_values(db):
    for values in (["\\."], ["\\.", "x"], [""], [None], [" "], ["a\rb"], ['"'], ["é,"]):
        cols = ", ".join(
            f"NULL::text AS c{i}" if v is None else f"{sql.Literal(v).as_string(db)}::text AS c{i}"
            for i, v in enumerate(values)
        )
        expected = pinned_copy(db, sql.SQL("SELECT " + cols))  # noqa: S608
        names = [f"c{i}".encode() for i in range(len(values))]
        ours = csv_line(names) + csv_line([None if v is None else v.encode() for v in values])
        assert ours == expected, values
    names = ["a", "Big Col", 'q"', "NULL", "nulls", "", "x\\y", "{b}", "t\tab", "nb\u00a0sp", "é"]
    (pg,) = db.execute("SELECT %s::text[]::text", [names]).fetchone()  # type: ignore[misc]
    assert text_array(names) == pg
    for us in (0, 1, 10, 500_000, 849093905476215, -1, -62_000_000_000_000_000):
        (text,) = db.execute(
            "SELECT set_config('TimeZone', 'UTC', false), ('2000-01-01 00:00:00+00'::timestamptz"
            " + %s * interval '1 microsecond')::text",
            [us],
        ).fetchone()[1:]  # type: ignore[index]
        assert pg_timestamptz_text(us) == text


def test_update_delete_truncate_toast(db, cdc_env):  # noqa: F811
    s, slot, pub = cdc_env
    kv, full = sql.Identifier(s, "kv"), sql.Identifier(s, "full")
    db.execute(sql.SQL('CREATE TABLE {} (id int PRIMARY KEY, v text, "Big Col" text)').format(kv))
    db.execute(sql.SQL('ALTER TABLE {} ALTER "Big Col" SET STORAGE EXTERNAL').format(kv))
    db.execute(sql.SQL("CREATE TABLE {} (a int, b text)").format(full))
    db.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(full))
    _setup(db, s, slot, pub, "kv", "full")
    big = "(SELECT string_agg(md5(x::text), '') FROM generate_series(1, 1000) x)"
    db.execute(sql.SQL("INSERT INTO {} VALUES (1, 'a', " + big + "), (2, '', NULL)").format(kv))  # noqa: S608
    db.execute(sql.SQL("UPDATE {} SET v = 'b' WHERE id = 1").format(kv))
    db.execute(sql.SQL("UPDATE {} SET id = 3, v = NULL WHERE id = 2").format(kv))
    db.execute(sql.SQL("DELETE FROM {} WHERE id = 1").format(kv))
    db.execute(sql.SQL("INSERT INTO {} VALUES (1, 'x'), (2, 'y')").format(full))
    db.execute(sql.SQL("UPDATE {} SET b = 'z' WHERE a = 1").format(full))
    db.execute(sql.SQL("DELETE FROM {} WHERE a = 2").format(full))
    db.execute(sql.SQL("TRUNCATE {}").format(kv))
    wait_flushed(db)
    with psycopg.connect(db.info.dsn) as reader:
        batch, files = read(reader, slot, pub)

    recs = raw_records(files.data(s, "kv"))
    assert recs[0] == [
        *(c.encode() for c in META_COLUMNS),
        b"id",
        b"v",
        b"Big Col",
        b"_unchanged",
        b"_old_id",
    ]
    (bigval,) = db.execute(sql.SQL("SELECT " + big)).fetchone()  # type: ignore[misc]  # noqa: S608
    body = [[r[0], *r[6:]] for r in recs[1:]]
    assert body == [
        [b"I", b"1", b"a", bigval.encode(), b"", b""],
        [b"I", b"2", b'""', b"", b"", b""],
        [b"U", b"1", b"b", b"", b'"{""Big Col""}"', b""],  # TOAST not sent: named, left empty
        [b"U", b"3", b"", b"", b"", b"2"],  # key changed: old key in _old_id
        [b"D", b"1", b"", b"", b"", b""],  # delete: the old key only
        [b"T", b"", b"", b"", b"", b""],
    ]
    assert [r[5] for r in recs[1:]] == [b"1", b"2", b"1", b"1", b"1", b"1"]
    lsns = [(r[1], r[2]) for r in recs[1:]]
    assert lsns == sorted(lsns) and all(c > x for c, x in lsns)
    recs = raw_records(files.data(s, "full"))
    assert recs[0][6:] == [b"a", b"b", b"_unchanged", b"_old_a", b"_old_b"]
    assert [[r[0], *r[6:]] for r in recs[1:]] == [
        [b"I", b"1", b"x", b"", b"", b""],
        [b"I", b"2", b"y", b"", b"", b""],
        [b"U", b"1", b"z", b"", b"1", b"x"],  # FULL: the whole old row, on every update
        [b"D", b"2", b"y", b"", b"", b""],  # FULL: the whole old row
    ]
    assert batch.counts() == {
        TableKey(s, "kv"): {"I": 2, "U": 2, "D": 1, "T": 1},
        TableKey(s, "full"): {"I": 2, "U": 1, "D": 1},
    }
    assert batch.transactions == 8 and batch.changes == 10
    kv_file, full_file = batch.files
    # each file's LSN and commit-time range: what the batch manifest will record per file
    assert (kv_file.first_commit_lsn, kv_file.last_commit_lsn) == (
        batch.first_commit_lsn,
        batch.last_commit_lsn,
    )
    assert (kv_file.first_commit_time, kv_file.last_commit_time) == (
        batch.first_commit_time,
        batch.last_commit_time,
    )
    assert batch.first_commit_lsn < full_file.first_commit_lsn < full_file.last_commit_lsn
    assert full_file.last_commit_lsn < batch.last_commit_lsn
    assert full_file.last_commit_lsn == max(int(r[1], 16) for r in recs[1:])


def test_schema_change_starts_a_new_file(db, cdc_env):  # noqa: F811
    s, slot, pub = cdc_env
    t = sql.Identifier(s, "evolving")
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(t))
    _setup(db, s, slot, pub, "evolving")
    db.execute(sql.SQL("INSERT INTO {} VALUES (1, 'a')").format(t))
    # an invalidation that re-sends the Relation with the same columns: same file
    db.execute(sql.SQL("ALTER TABLE {} ALTER v SET DEFAULT 'd'").format(t))
    db.execute(sql.SQL("INSERT INTO {} VALUES (2, 'b')").format(t))
    db.execute(sql.SQL("ALTER TABLE {} ADD COLUMN w int").format(t))
    db.execute(sql.SQL("INSERT INTO {} VALUES (3, 'c', 3)").format(t))
    db.execute(sql.SQL("ALTER TABLE {} ALTER w TYPE bigint").format(t))
    db.execute(sql.SQL("INSERT INTO {} VALUES (4, 'd', 4)").format(t))
    wait_flushed(db)
    with psycopg.connect(db.info.dsn) as reader:
        batch, files = read(reader, slot, pub)
    assert [(f.part, f.rows, [c.name for c in f.columns]) for f in batch.files] == [
        (0, 2, ["id", "v"]),
        (1, 1, ["id", "v", "w"]),
        (2, 1, ["id", "v", "w"]),
    ]
    assert [c.type_oid for c in batch.files[2].columns] == [23, 25, 20]
    assert raw_records(files.data(s, "evolving", 1))[0][6:9] == [b"id", b"v", b"w"]
    assert [r[6] for r in raw_records(files.data(s, "evolving", 2))[1:]] == [b"4"]


def test_partitioned_table_changes_arrive_under_the_parent(db, cdc_env):  # noqa: F811
    s, slot, pub = cdc_env
    p = sql.Identifier(s, "events")
    db.execute(
        sql.SQL("CREATE TABLE {} (id int, day date, v text, PRIMARY KEY (id, day))"
                " PARTITION BY RANGE (day)").format(p)
    )  # fmt: skip
    for name, lo, hi in (("e1", "2026-01-01", "2026-02-01"), ("e2", "2026-02-01", "2026-03-01")):
        db.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(s, name), p, sql.Literal(lo), sql.Literal(hi)
            )
        )
    _setup(db, s, slot, pub, "events")
    db.execute(
        sql.SQL("INSERT INTO {} VALUES (1, '2026-01-05', 'a'), (2, '2026-02-05', 'b')").format(p)
    )
    db.execute(sql.SQL("UPDATE {} SET day = '2026-02-10' WHERE id = 1").format(p))  # moves
    # a partition attached after the publication was made: still published under the parent
    db.execute(
        sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ('2026-03-01') TO ('2026-04-01')")
        .format(sql.Identifier(s, "e3"), p)
    )  # fmt: skip
    db.execute(sql.SQL("INSERT INTO {} VALUES (3, '2026-03-05', 'c')").format(p))
    db.execute(sql.SQL("DELETE FROM {} WHERE id = 2").format(p))
    wait_flushed(db)
    with psycopg.connect(db.info.dsn) as reader:
        batch, files = read(reader, slot, pub)
    assert {f.table for f in batch.files} == {TableKey(s, "events")}
    body = [[r[0], *r[6:9]] for r in raw_records(files.data(s, "events"))[1:]]
    assert body == [
        [b"I", b"1", b"2026-01-05", b"a"],
        [b"I", b"2", b"2026-02-05", b"b"],
        [b"D", b"1", b"2026-01-05", b""],  # a row changing partition: delete + insert
        [b"I", b"1", b"2026-02-10", b"a"],
        [b"I", b"3", b"2026-03-05", b"c"],
        [b"D", b"2", b"2026-02-05", b""],
    ]


def test_batches_hold_whole_transactions_and_advance_exactly(db, cdc_env):  # noqa: F811
    s, slot, pub = cdc_env
    t = sql.Identifier(s, "seq")
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(t))
    _setup(db, s, slot, pub, "seq")
    for lo in (1, 4, 7):  # three transactions of three rows
        db.execute(
            sql.SQL("INSERT INTO {} SELECT generate_series(%s::int, %s::int)").format(t),
            [lo, lo + 2],
        )
    wait_flushed(db)
    seen: list[bytes] = []
    starts = []
    with psycopg.connect(db.info.dsn) as reader:
        for _ in range(3):
            # one message is enough to stop after the first transaction: never mid-transaction
            batch, files = read(reader, slot, pub, max_messages=1, itersize=2)
            assert batch.transactions == 1 and batch.changes == 3
            starts.append(batch.start_lsn)
            seen += [r[6] for r in raw_records(files.data(s, "seq"))[1:]]
            with psycopg.connect(db.info.dsn, autocommit=True) as c:
                assert batch.end_lsn is not None
                assert cdc_slot.advance_slot(c, slot, batch.end_lsn) == batch.end_lsn
        batch, files = read(reader, slot, pub)
    assert batch.empty and batch.files == [] and files.files == {}
    assert seen == [str(i).encode() for i in range(1, 10)]
    assert starts == sorted(starts) and len(set(starts)) == 3


def test_a_stream_ending_inside_a_transaction_is_an_error():
    files = MemoryFiles()
    w = ChangeWriter(files.open_part, files.compressor)
    w.relation(Relation(1, "s", "t", "d", (Column(1, "id", 23, -1),)))
    w.begin(Begin(100, 0, 7))
    w.data(50, b"I" + struct.pack(">IcHci", 1, b"N", 1, b"t", 1) + b"1")
    with pytest.raises(ProtocolError, match="inside a transaction"):
        w.finish()
    w.commit(Commit(0, 100, 120, 0))
    assert [f.rows for f in w.finish()] == [1]


def test_a_column_named_like_a_change_column_is_refused():
    files = MemoryFiles()
    w = ChangeWriter(files.open_part, files.compressor)
    cols = (Column(1, "id", 23, -1), Column(0, "_op", 25, -1))
    with pytest.raises(ValueError, match="table \"Sales Dept\".t: column '_op' clashes"):
        w.relation(Relation(1, "Sales Dept", "t", "d", cols))
    cols = (Column(1, "id", 23, -1), Column(0, "_old_id", 25, -1))
    with pytest.raises(ValueError, match="column '_old_id' clashes"):
        w.relation(Relation(1, "s", "t", "d", cols))


def test_pinned_settings_are_the_contract():
    assert PINNED_SETTINGS["TimeZone"] == "UTC" and PINNED_SETTINGS["DateStyle"] == "ISO, MDY"

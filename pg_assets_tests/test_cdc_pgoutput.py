"""The pgoutput decoder against the real server: our decoding of a slot's stream, rendered in
test_decoding's format, is line for line (and LSN for LSN) what PostgreSQL's own test_decoding
plugin prints for the same changes."""

import struct

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.cdc import pgoutput as po
from pg_assets.core.cdc import slot as cdc_slot
from pg_assets.core.cdc.changes import NEVER_QUOTED_TYPES, csv_field, csv_tuple
from pg_assets.core.cdc.lsn import format_lsn, lsn_hex, parse_lsn, parse_lsn_hex
from pg_assets.core.cdc.reader import iter_messages
from pg_assets.core.identifiers import QualifiedName
from pg_assets_tests.cdc_support import cdc_env, cdc_names, wait_flushed  # noqa: F401

RAW_TYPES = {21, 23, 20, 26, 700, 701, 1700}  # printed bare by test_decoding


def test_lsn_forms():
    assert parse_lsn("16/B374D848") == 0x16B374D848
    assert format_lsn(0x16B374D848) == "16/B374D848"
    assert format_lsn(0) == "0/0"
    assert lsn_hex(0x16B374D848) == "00000016B374D848"
    assert parse_lsn_hex("00000016B374D848") == 0x16B374D848
    names = sorted(lsn_hex(x) for x in (0xA, 0x1_0000_0000, 0x9, 0xFFFF_FFFF))
    assert [parse_lsn_hex(n) for n in names] == [0x9, 0xA, 0xFFFF_FFFF, 0x1_0000_0000]
    for bad in ("16B374D848", "1/2/3", "g/0", ""):
        with pytest.raises(ValueError):
            parse_lsn(bad)
    with pytest.raises(ValueError):
        parse_lsn_hex("00000016b374d848")


def test_binary_values_and_garbage_are_errors():
    insert = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 1) + b"b" + b"\0\0\0\1x"
    with pytest.raises(po.ProtocolError, match="binary"):
        po.decode(insert)
    with pytest.raises(po.ProtocolError):
        po.decode(insert[:-3].replace(b"b", b"t"))  # length overruns the message
    with pytest.raises(po.ProtocolError, match="unknown"):
        po.decode(b"Z")


def _literal(type_oid: int, value: bytes) -> str:
    text = value.decode()
    if type_oid in RAW_TYPES:
        return text
    if type_oid in (1560, 1562):
        return f"B'{text}'"
    if type_oid == 16:
        return "true" if text == "t" else "false"
    return "'" + text.replace("'", "''") + "'"


class Renderer:
    """Our decoded messages in test_decoding's output format (contrib/test_decoding)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.relations: dict[int, po.Relation] = {}
        self.xid = 0

    def q(self, name: str) -> str:
        return self.conn.execute("SELECT quote_ident(%s)", [name]).fetchone()[0]  # type: ignore[index]

    def type_name(self, oid: int) -> str:
        return self.conn.execute("SELECT format_type(%s, NULL)", [oid]).fetchone()[0]  # type: ignore[index]

    def table(self, relid: int) -> str:
        rel = self.relations[relid]
        return f"{self.q(rel.namespace)}.{self.q(rel.name)}"

    def tuple_(self, relid: int, values: list[po.Value], skip_nulls: bool) -> str:
        out = []
        for col, v in zip(self.relations[relid].columns, values, strict=True):
            if v is None and skip_nulls:
                continue
            if v is None:
                text = "null"
            elif v is po.UNCHANGED:
                text = "unchanged-toast-datum"
            else:
                text = _literal(col.type_oid, v)  # type: ignore[arg-type]
            out.append(f" {self.q(col.name)}[{self.type_name(col.type_oid)}]:{text}")
        return "".join(out)

    def render(self, msg: po.Decoded) -> str | None:
        if isinstance(msg, po.Begin):
            self.xid = msg.xid
            return f"BEGIN {msg.xid}"
        if isinstance(msg, po.Commit):
            return f"COMMIT {self.xid}"
        if isinstance(msg, po.Relation):
            self.relations[msg.relid] = msg
            return None
        if isinstance(msg, po.Insert):
            return f"table {self.table(msg.relid)}: INSERT:" + self.tuple_(
                msg.relid, msg.new, False
            )
        if isinstance(msg, po.Update):
            line = f"table {self.table(msg.relid)}: UPDATE:"
            if msg.old is not None:
                line += " old-key:" + self.tuple_(msg.relid, msg.old, True) + " new-tuple:"
            return line + self.tuple_(msg.relid, msg.new, False)
        if isinstance(msg, po.Delete):
            return f"table {self.table(msg.relid)}: DELETE:" + self.tuple_(msg.relid, msg.old, True)
        if isinstance(msg, po.Truncate):
            flags = (" restart_seqs" if msg.restart_identity else "") + (
                " cascade" if msg.cascade else ""
            )
            names = ", ".join(self.table(r) for r in msg.relids)
            return f"table {names}: TRUNCATE:" + (flags or " (no-flags)")
        raise AssertionError(f"unexpected {msg}")


def _check_fused(data: bytes, msg: po.Decoded, relations: dict[int, po.Relation]) -> None:
    """The writer's fused tuple → CSV path equals csv_field over the reference decoder."""

    def reference(values: list[po.Value]) -> tuple[list[bytes], list[int] | None]:
        fields = [csv_field(None if v is po.UNCHANGED else v) for v in values]  # type: ignore[arg-type]
        unchanged = [i for i, v in enumerate(values) if v is po.UNCHANGED]
        return fields, unchanged or None

    tuples = []
    if isinstance(msg, po.Insert):
        tuples = [msg.new]
    elif isinstance(msg, po.Update):
        tuples = [t for t in (msg.old, msg.new) if t is not None]
    elif isinstance(msg, po.Delete):
        tuples = [msg.old]
    pos = 5
    for values in tuples:
        assert data[pos] in b"KON"  # the tuple's tag follows the relid (or the old tuple)
        plain = [c.type_oid in NEVER_QUOTED_TYPES for c in relations[msg.relid].columns]  # type: ignore[union-attr]
        assert csv_tuple(data, pos + 1, plain)[::2] == reference(values)
        fields, pos, unchanged = csv_tuple(data, pos + 1)
        assert (fields, unchanged) == reference(values)


def _strip_empty(lines: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop BEGIN/COMMIT pairs with nothing of ours in between (pgoutput skips them)."""
    out: list[tuple[str, str]] = []
    for lsn, line in lines:
        if line.startswith("COMMIT") and out and out[-1][1].startswith("BEGIN"):
            out.pop()
        else:
            out.append((lsn, line))
    return out


def test_decoded_stream_matches_test_decoding(db: psycopg.Connection, cdc_env):  # noqa: F811
    s, slot, pub = cdc_env
    ident = sql.Identifier
    items, lines, full = ident(s, "items"), ident(s, "Order Lines"), ident(s, "full_ident")
    db.execute(
        sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY, name text, qty numeric(10,2), ok bool,"
            " flags bit(4), tags text[], doc jsonb, big text)"
        ).format(items)
    )
    db.execute(sql.SQL("ALTER TABLE {} ALTER big SET STORAGE EXTERNAL").format(items))
    db.execute(
        sql.SQL('CREATE TABLE {} ("Line No" int PRIMARY KEY, "Qty, Units" text, f float8)').format(
            lines
        )
    )
    db.execute(sql.SQL("CREATE TABLE {} (a int, b text)").format(full))
    db.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(full))
    tables = [
        QualifiedName(s, "items"),
        QualifiedName(s, "Order Lines"),
        QualifiedName(s, "full_ident"),
    ]
    cdc_slot.ensure_publication(db, pub, tables)
    assert cdc_slot.ensure_slot(db, slot)
    td = slot + "_td"
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [td])
    try:
        db.execute(
            sql.SQL(
                "INSERT INTO {} SELECT g, 'n ' || g || ' it''s, \"q\"' || chr(10) || 'é',"
                " g * 1.25, g % 2 = 0, B'1010', ARRAY['a b', NULL, 'c'], jsonb_build_object('k', g),"
                " CASE WHEN g = 1 THEN (SELECT string_agg(md5(x::text), '') FROM"
                " generate_series(1, 4000) x) END FROM generate_series(1, 5) g"
            ).format(items)
        )
        db.execute(sql.SQL("UPDATE {} SET qty = 99 WHERE id = 1").format(items))  # big: 'u'
        db.execute(sql.SQL("UPDATE {} SET id = 10 WHERE id = 2").format(items))  # old key 'K'
        db.execute(sql.SQL("DELETE FROM {} WHERE id = 3").format(items))
        db.execute(sql.SQL("UPDATE {} SET name = '', doc = NULL WHERE id = 4").format(items))
        with db.transaction():
            db.execute(
                sql.SQL("INSERT INTO {} VALUES (1, 'x', 1.5), (2, NULL, 'NaN')").format(lines)
            )
            db.execute(sql.SQL("INSERT INTO {} VALUES (1, 'one'), (2, NULL)").format(full))
            db.execute(sql.SQL("UPDATE {} SET b = 'uno' WHERE a = 1").format(full))  # old row 'O'
            db.execute(sql.SQL("DELETE FROM {} WHERE a = 2").format(full))
        with db.transaction():
            db.execute(sql.SQL("INSERT INTO {} (id) VALUES (20)").format(items))
            try:
                with db.transaction():
                    db.execute(sql.SQL("INSERT INTO {} (id) VALUES (21)").format(items))
                    raise RuntimeError("roll back the savepoint")
            except RuntimeError:
                pass
            db.execute(sql.SQL("INSERT INTO {} (id) VALUES (22)").format(items))
        try:
            with db.transaction():
                db.execute(sql.SQL("INSERT INTO {} (id) VALUES (30)").format(items))
                raise RuntimeError("abort")
        except RuntimeError:
            pass
        db.execute(sql.SQL("TRUNCATE {}, {} RESTART IDENTITY").format(items, lines))
        db.execute(sql.SQL("ALTER TABLE {} ADD COLUMN extra int").format(items))
        db.execute(sql.SQL("INSERT INTO {} (id, extra) VALUES (40, 4)").format(items))
        wait_flushed(db)

        ours: list[tuple[str, str]] = []
        renderer = Renderer(db)
        with psycopg.connect(db.info.dsn) as reader, reader.transaction():
            for lsn, data in iter_messages(reader, slot, pub, itersize=3):
                msg = po.decode(data)
                line = renderer.render(msg)
                _check_fused(data, msg, renderer.relations)
                if line is not None:
                    ours.append((format_lsn(lsn), line))
        theirs = db.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_changes(%s, NULL, NULL,"
            " 'skip-empty-xacts', '1', 'include-xids', '1')",
            [td],
        ).fetchall()
        prefix = f"table {renderer.q(s)}."
        theirs = _strip_empty(
            [(lsn, d) for lsn, d in theirs if not d.startswith("table ") or d.startswith(prefix)]
        )
    finally:
        db.execute("SELECT pg_drop_replication_slot(%s)", [td])
    assert len([x for x in ours if x[1].startswith("BEGIN")]) == 9
    assert any("unchanged-toast-datum" in x[1] for x in ours)
    assert any("old-key" in x[1] and "full_ident" in x[1] for x in ours)
    assert ours == theirs


def test_protocol_2_streamed_transaction(db: psycopg.Connection, cdc_env):  # noqa: F811
    """With `streaming` (protocol 2) a large transaction arrives in Stream Start/Stop blocks
    whose data messages carry its xid; `Decoder` reads them. (pg_assets reads protocol 1.)"""
    s, slot, pub = cdc_env
    t = sql.Identifier(s, "big")
    db.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(t))
    cdc_slot.ensure_publication(db, pub, [QualifiedName(s, "big")])
    cdc_slot.ensure_slot(db, slot)
    db.execute(
        sql.SQL("INSERT INTO {} SELECT g, repeat('v', 100) FROM generate_series(1, 5000) g").format(
            t
        )
    )
    wait_flushed(db)
    decoder = po.Decoder()
    msgs = []
    with psycopg.connect(db.info.dsn) as reader, reader.transaction():
        reader.execute("SET LOCAL logical_decoding_work_mem = '64kB'")
        rows = reader.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '2', 'streaming', 'on', 'publication_names', %s)",
            [slot, pub],
        ).fetchall()
        msgs = [decoder.decode(r[0]) for r in rows]
    starts = [m for m in msgs if isinstance(m, po.StreamStart)]
    inserts = [m for m in msgs if isinstance(m, po.Insert)]
    (commit,) = [m for m in msgs if isinstance(m, po.StreamCommit)]
    assert len(starts) > 1 and starts[0].first_segment and not starts[1].first_segment
    assert {m.xid for m in inserts} == {starts[0].xid} == {commit.xid}
    assert [int(m.new[0]) for m in inserts] == list(range(1, 5001))  # type: ignore[arg-type]
    assert not decoder.in_stream

"""Bad configuration and awkward identifiers: one clear error naming file, table and key;
quoted identifiers work; SQL cannot be smuggled through a name."""

import datetime as dt
import gzip

import psycopg
import pytest
from dagster import DagsterInvariantViolationError, DagsterUnknownPartitionError

from pg_assets.config import ConfigError
from pg_assets.core.identifiers import QualifiedName
from pg_assets_tests.conftest import day_query, postgres_copy, write_config

DAY = dt.date(2026, 10, 2)


@pytest.fixture(scope="module")
def odd(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        c.execute('DROP SCHEMA IF EXISTS "Odd ""Schema""" CASCADE')
        c.execute('CREATE SCHEMA "Odd ""Schema"""')
        c.execute(
            'CREATE TABLE "Odd ""Schema"""."Order Lines" ("Line Id" int, "Order Date" date, '
            '"Amount, EUR" numeric, amount int) PARTITION BY RANGE ("Order Date")'
        )
        c.execute(
            'CREATE TABLE "Odd ""Schema"""."Order Lines 2026-10" PARTITION OF '
            '"Odd ""Schema"""."Order Lines" FOR VALUES FROM (\'2026-10-01\') TO (\'2026-11-01\')'
        )
        c.execute(
            'INSERT INTO "Odd ""Schema"""."Order Lines" SELECT g, date \'2026-10-01\' + g % 5, '
            "g * 1.5, g FROM generate_series(1, 1000) g"
        )
        c.execute("DROP TABLE IF EXISTS public.victim")
        c.execute("CREATE TABLE public.victim (d date)")
        c.execute("DROP TABLE IF EXISTS public.no_date")
        c.execute("CREATE TABLE public.no_date (id int, label text)")


def test_quoted_identifiers_work(odd, project, db):
    p = project(
        [
            {
                "table": '"Odd ""Schema"""."Order Lines"',
                "partition_column": '"Order Date"',
                "start": "2026-10-01",
            }
        ]
    )
    assert p.asset().key.path == ["test", "Odd__Schema_", "Order_Lines"]
    result = p.materialize(DAY.isoformat())
    assert result.success
    name = QualifiedName('Odd "Schema"', "Order Lines")
    data, _ = p.read_day(name, DAY)
    expected = postgres_copy(db, day_query(name.identifier, "Order Date", DAY))
    assert gzip.decompress(data) == expected
    assert expected.startswith(b'Line Id,Order Date,"Amount, EUR",amount\n')


@pytest.mark.parametrize(
    "entry,key,fragment",
    [
        (
            {"table": "public.victim", "partition_column": "d", "colour": "red"},
            "colour",
            "unknown key",
        ),
        (
            {"table": "public.victim", "partition_column": "d", "start": "2026-13-01"},
            "start",
            "date",
        ),
        (
            {"table": "public.victim", "partition_column": "d", "timezone": "Mars/Base"},
            "timezone",
            "Mars/Base",
        ),
        (
            {"table": "public.victim; DROP TABLE public.victim", "partition_column": "d"},
            "table",
            "unexpected ';'",
        ),
        (
            {"table": "public.victim", "partition_column": "d) OR (1=1"},
            "partition_column",
            "unexpected ')'",
        ),
    ],
)
def test_static_config_errors_name_file_table_and_key(tmp_path, entry, key, fragment):
    with pytest.raises(ConfigError) as err:
        write_config(tmp_path / "bad.yaml", [entry])
    message = str(err.value)
    assert str(tmp_path / "bad.yaml") in message
    assert entry["table"] in message
    assert f"key '{key}'" in message and fragment in message
    assert "\n" not in message  # one error, one line


def test_unknown_top_level_key_and_bad_codec(tmp_path):
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'bronze.codec': unknown codec 'lz4'"):
        write_config(
            tmp_path / "bad.yaml",
            [{"table": "t", "partition_column": "d"}],
            bronze={"codec": "lz4"},
        )
    with pytest.raises(ConfigError, match=r"key 'bronze.adls.colour': unknown key"):
        write_config(
            tmp_path / "bad.yaml",
            [{"table": "t", "partition_column": "d"}],
            bronze={"adls": {"auth": "sas", "colour": "red"}},
        )
    with pytest.raises(ConfigError, match=r"key 'sources': unknown key"):
        write_config(tmp_path / "bad.yaml", [{"table": "t", "partition_column": "d"}], sources="x")


@pytest.mark.parametrize(
    "entry,key,fragment",
    [
        ({"table": "public.missing_table", "partition_column": "d"}, "table", "does not exist"),
        (
            {"table": "public.victim", "partition_column": "nope"},
            "partition_column",
            "has no column nope (columns: d)",
        ),
        (
            {"table": "public.no_date", "partition_column": "label"},
            "partition_column",
            "type text, which cannot be split by day",
        ),
        # a quoted name is passed through psycopg.sql.Identifier: harmless, just not found
        (
            {"table": '"public.victim; DROP TABLE public.victim; --"', "partition_column": "d"},
            "table",
            "does not exist",
        ),
    ],
)
def test_catalog_errors_at_load(odd, project, db, entry, key, fragment):
    with pytest.raises(ConfigError) as err:
        project([{**entry, "start": "2026-10-01"}])
    message = str(err.value)
    assert "pg_assets.yaml" in message and entry["table"] in message
    assert f"key '{key}'" in message and fragment in message
    assert db.execute("SELECT to_regclass('public.victim')").fetchone()[0] is not None


def test_partition_before_first_day_is_rejected(odd, project):
    p = project([{"table": "public.victim", "partition_column": "d", "start": "2026-10-01"}])
    with pytest.raises((DagsterUnknownPartitionError, DagsterInvariantViolationError)) as err:
        p.materialize("2026-09-30")
    assert "2026-09-30" in str(err.value)


def test_start_required_when_nothing_to_derive_it_from(odd, project):
    with pytest.raises(
        ConfigError, match="key 'start': not set and public.victim has no partition bounds"
    ):
        project([{"table": "public.victim", "partition_column": "d"}])


def test_unreachable_database_at_load(project, monkeypatch):
    """With every `start` set the location still loads (checks move into the runs);
    without one, the error says which table needs it."""
    monkeypatch.setenv("PG_ASSETS_DOWN", "host=127.0.0.1 port=1 user=x password=s3cret")
    p = project(
        [{"table": "public.victim", "partition_column": "d", "start": "2026-10-01"}],
        postgres={"conninfo_env": "PG_ASSETS_DOWN", "connect_timeout_s": 1},
    )
    assert p.asset().partitions_def.start.date().isoformat() == "2026-10-01"
    result = p.materialize("2026-10-02")
    assert not result.success
    assert "s3cret" not in str([e.event_specific_data for e in result.all_events])
    with pytest.raises(ConfigError, match=r"table 'public.victim': key 'start': not set") as err:
        project(
            [{"table": "public.victim", "partition_column": "d"}],
            postgres={"conninfo_env": "PG_ASSETS_DOWN", "connect_timeout_s": 1},
        )
    assert "s3cret" not in str(err.value)

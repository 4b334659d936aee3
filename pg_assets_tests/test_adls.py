"""Bronze on ADLS Gen2: the real azure-storage-file-datalake SDK, through the project's sink,
against the protocol-level test server on loopback."""

import base64
import datetime as dt
import gzip
import hashlib

import psycopg
import pytest
from psycopg import sql

from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths
from pg_assets.dev.demo_data import create_daily_partitioned
from pg_assets.sinks.adls import AdlsSink
from pg_assets_tests.adls_server import Fault
from pg_assets_tests.conftest import ACCOUNT_KEY, adls_bronze, day_query, postgres_copy

DAYS = [dt.date(2026, 10, 1), dt.date(2026, 10, 2)]
SMALL, LARGE = 4_000, 40_000
TABLE = {"table": "lake.orders", "partition_column": "order_date", "start": "2026-10-01"}


@pytest.fixture(scope="module")
def orders(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as c:
        create_daily_partitioned(c, "lake", "orders", DAYS, SMALL)
        c.execute(
            "INSERT INTO lake.orders SELECT id + 100000000, order_date, created_at, customer_id,"
            " amount, status, attrs, tags, note FROM lake.orders, generate_series(1, 9)"
            " WHERE order_date = %s",
            (DAYS[1],),
        )


NAME = QualifiedName("lake", "orders")


def paths(day: dt.date):
    return daily_paths("test", NAME, day)


def lake(relpath: str) -> str:
    return f"lake/{relpath}"


def test_partition_on_adls_matches_postgres_copy(orders, adls, project, db):
    p = project([TABLE], bronze=adls_bronze(adls))
    result = p.materialize(DAYS[0].isoformat())
    assert result.success
    meta = p.metadata(result)
    files = adls.files("bronze")
    data, manifest = p.read_day(NAME, DAYS[0])
    data_rel = f"{paths(DAYS[0]).folder}/{manifest['file']}"
    expected = postgres_copy(db, day_query(sql.Identifier("lake", "orders"), "order_date", DAYS[0]))
    assert gzip.decompress(data) == expected

    uri = f"abfss://bronze@devstoreaccount1.dfs.core.windows.net/lake/{data_rel}"
    assert manifest["uri"] == meta["dagster/uri"] == uri
    assert manifest["rows"] == SMALL and manifest["sha256"] == hashlib.sha256(data).hexdigest()
    stored = adls.filesystems["bronze"][lake(data_rel)]
    assert manifest["etag"] == stored.etag
    assert stored.content_type == "application/gzip"
    assert base64.b64decode(stored.content_md5) == hashlib.md5(data).digest()
    assert [f for f in files if "_staging" in f] == []


def test_uploads_stream_in_bounded_appends(orders, adls, project):
    p = project([TABLE], bronze={**adls_bronze(adls), "block_size_mib": 0.05})
    counts = []
    for day in DAYS:
        before = len(adls.ops("append"))
        assert p.materialize(day.isoformat()).success
        counts.append(len(adls.ops("append")) - before)
    assert adls.max_body <= int(0.05 * 1024 * 1024)
    assert counts[0] >= 2 and counts[1] >= 3 * counts[0]  # 10x the rows → many more appends
    assert len(adls.ops("flush")) == 2 * len(DAYS)  # one per data file and one per manifest


def test_failed_append_leaves_nothing_and_rerun_succeeds(orders, adls, project, db):
    p = project([TABLE], bronze=adls_bronze(adls))
    adls.faults.append(Fault("append", nth=3, status=500, code="InternalError"))
    result = p.materialize(DAYS[1].isoformat())
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    for part in (
        "lake.orders",
        "2026-10-02",
        "account devstoreaccount1",
        "filesystem bronze",
        "_staging/",
        "HTTP 500 InternalError",
    ):
        assert part in message
    assert ACCOUNT_KEY not in message
    assert adls.files("bronze") == {}  # no data, no manifest, no staging file

    adls.faults.clear()
    assert p.materialize(DAYS[1].isoformat()).success
    data, _ = p.read_day(NAME, DAYS[1])
    expected = postgres_copy(db, day_query(sql.Identifier("lake", "orders"), "order_date", DAYS[1]))
    assert gzip.decompress(data) == expected


def test_failure_keeps_previous_version(orders, adls, project):
    p = project([TABLE], bronze=adls_bronze(adls))
    assert p.materialize(DAYS[0].isoformat()).success
    before = adls.files("bronze")
    adls.faults.append(Fault("flush", nth=1, status=500, code="InternalError"))
    assert not p.materialize(DAYS[0].isoformat()).success
    assert adls.files("bronze") == before


def test_transient_errors_are_retried_by_the_sdk(orders, adls, project):
    p = project([TABLE], bronze=adls_bronze(adls))
    adls.faults.append(Fault("append", nth=2, status=503, code="ServerBusy", times=1))
    assert p.materialize(DAYS[0].isoformat()).success
    assert len([f for f in adls.files("bronze") if f.endswith(".csv.gz")]) == 1


def test_forbidden_is_clear_and_keeps_secrets(orders, adls, project):
    p = project([TABLE], bronze=adls_bronze(adls, create_filesystem=False))
    adls.forbidden = True
    result = p.materialize(DAYS[0].isoformat())
    assert not result.success
    text = str([e.event_specific_data for e in result.all_events])
    assert "HTTP 403 AuthorizationPermissionMismatch" in text
    assert "account devstoreaccount1, filesystem bronze" in text
    assert ACCOUNT_KEY not in text


def test_missing_filesystem_is_clear(orders, adls, project):
    p = project([TABLE], bronze=adls_bronze(adls, create_filesystem=False))
    result = p.materialize(DAYS[0].isoformat())
    assert not result.success
    text = str([e.event_specific_data for e in result.all_events])
    assert "HTTP 404 FilesystemNotFound" in text and "create_filesystem: true" in text


@pytest.mark.parametrize("auth", ["sas", "connection_string"])
def test_other_auth_modes(adls, monkeypatch, auth):
    secret = {
        "sas": "sv=2025-01-05&ss=b&srt=co&sp=rwdlac&se=2030-01-01T00:00:00Z&sig=c2VjcmV0LXNpZw%3D%3D",
        "connection_string": "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={ACCOUNT_KEY};BlobEndpoint={adls.url}",
    }[auth]
    monkeypatch.setenv("PG_ASSETS_TEST_SECRET", secret)
    sink = AdlsSink.from_uri(
        "abfss://bronze@devstoreaccount1.dfs.core.windows.net/x",
        auth=auth, secret_env="PG_ASSETS_TEST_SECRET",
        endpoint=adls.url if auth == "sas" else None,
        create_filesystem=True, max_retries=0,
    )  # fmt: skip
    assert sink.write_bytes("r1", "a/b.json", b"{}", "application/json").size == 2
    assert sink.read_bytes("a/b.json") == b"{}" and sink.list_files() == ["a/b.json"]
    adls.forbidden = True
    with pytest.raises(Exception) as err:
        sink.read_bytes("a/b.json")
    assert "sig=" not in str(err.value) or "sig=***" in str(err.value)
    assert "c2VjcmV0LXNpZw" not in str(err.value) and ACCOUNT_KEY not in str(err.value)


def test_plain_http_only_on_loopback():
    with pytest.raises(ValueError, match="must use https"):
        AdlsSink.from_uri(
            "abfss://bronze@acct.dfs.core.windows.net/x",
            auth="default_credential",
            endpoint="http://storage.example.com/acct",
        )
    with pytest.raises(ValueError, match="not an ADLS Gen2 URI"):
        AdlsSink.from_uri("abfss://bronze/acct")

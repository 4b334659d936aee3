"""Bronze on ADLS Gen2: the real azure-storage-file-datalake SDK, through the project's sink,
against the protocol-level test server on loopback."""

import base64
import datetime as dt
import gzip
import hashlib

import psycopg
import pytest
from azure.storage.filedatalake import AccountSasPermissions, ResourceTypes, generate_account_sas
from psycopg import sql

from pg_assets.core.identifiers import QualifiedName
from pg_assets.core.layout import daily_paths
from pg_assets.dev.demo_data import create_daily_partitioned
from pg_assets.sinks.adls import AdlsError, AdlsSink, RetryPolicy
from pg_assets_tests.adls_server import Fault
from pg_assets_tests.conftest import ACCOUNT_KEY, adls_bronze, day_query, postgres_copy

ROOT = "abfss://bronze@devstoreaccount1.dfs.core.windows.net/x"

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


def data_file(files: dict[str, bytes], day: dt.date) -> str:
    """The one data file of a day folder, found by listing (names are versioned)."""
    folder = lake(paths(day).folder) + "/"
    (name,) = [f for f in files if f.startswith(folder) and ".csv" in f.rsplit("/", 1)[1]]
    return name


def key_sink(server, key: str = ACCOUNT_KEY, monkeypatch=None, **options) -> AdlsSink:
    monkeypatch.setenv("PG_ASSETS_TEST_KEY", key)
    return AdlsSink.from_uri(ROOT, auth="account_key", secret_env="PG_ASSETS_TEST_KEY",
                             endpoint=server.url, create_filesystem=True,
                             **{"max_retries": 0, "retry_backoff_s": 0, **options})  # fmt: skip


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
    assert "lake/_staging" not in adls.directories["bronze"]  # no empty staging folder left
    # the day folder is created once (the rename needs it), not once per file
    assert len([r for r in adls.ops("mkdir") if r[2].endswith(paths(DAYS[0]).folder)]) == 1


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
        f"ADLS append of lake/{paths(DAYS[1]).folder}/",  # the destination first
        "account devstoreaccount1",
        "filesystem bronze",
        "staging file lake/_staging/",  # then where it was being staged
        "HTTP 500 InternalError",
    ):
        assert part in message
    assert ACCOUNT_KEY not in message
    assert adls.files("bronze") == {}  # no data, no manifest, no staging file
    assert "lake/_staging" not in adls.directories["bronze"]

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


def account_sas(key: str = ACCOUNT_KEY, hours: float = 1) -> str:
    return generate_account_sas(
        "devstoreaccount1",
        key,
        ResourceTypes(file_system=True, object=True),
        AccountSasPermissions(read=True, write=True, delete=True, list=True, create=True),
        dt.datetime.now(dt.UTC) + dt.timedelta(hours=hours),
    )


@pytest.mark.parametrize("auth", ["sas", "connection_string"])
def test_other_auth_modes(adls, monkeypatch, auth):
    secret = {
        "sas": account_sas(),
        "connection_string": "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={ACCOUNT_KEY};BlobEndpoint={adls.url}",
    }[auth]
    monkeypatch.setenv("PG_ASSETS_TEST_SECRET", secret)
    sink = AdlsSink.from_uri(
        ROOT, auth=auth, secret_env="PG_ASSETS_TEST_SECRET",
        endpoint=adls.url if auth == "sas" else None,
        create_filesystem=True, max_retries=0,
    )  # fmt: skip
    assert sink.write_bytes("r1", "a/b.json", b"{}", "application/json").size == 2
    assert sink.read_bytes("a/b.json") == b"{}" and sink.list_files() == ["a/b.json"]
    assert adls.auth_failures == []
    adls.forbidden = True
    with pytest.raises(Exception) as err:
        sink.read_bytes("a/b.json")
    assert "sig=" not in str(err.value) or "sig=***" in str(err.value)
    assert ACCOUNT_KEY not in str(err.value)
    assert secret.rsplit("sig=", 1)[-1] not in str(err.value)


@pytest.mark.parametrize("credential", ["account_key", "sas", "expired sas"])
def test_wrong_credential_fails_like_azure(adls, monkeypatch, credential):
    """The test server verifies signatures as Azure Storage does, so a wrong key fails."""
    other_key = base64.b64encode(b"not the account key, 64 bytes long" * 2).decode()
    secret, auth = {
        "account_key": (other_key, "account_key"),
        "sas": (account_sas(key=other_key), "sas"),
        "expired sas": (account_sas(hours=-1), "sas"),
    }[credential]
    monkeypatch.setenv("PG_ASSETS_TEST_SECRET", secret)
    with pytest.raises(AdlsError) as err:
        AdlsSink.from_uri(ROOT, auth=auth, secret_env="PG_ASSETS_TEST_SECRET",
                          endpoint=adls.url, create_filesystem=True, max_retries=0)  # fmt: skip
    message = str(err.value)
    assert "HTTP 403 AuthenticationFailed" in message
    assert "check the account key or SAS token" in message
    assert other_key not in message and secret not in message
    assert adls.auth_failures and adls.files("bronze") == {}

    # the right key, against the same server, passes
    sink = key_sink(adls, monkeypatch=monkeypatch)
    assert sink.write_bytes("r", "a/ok.json", b"{}", "application/json").size == 2


def test_plain_http_only_on_loopback(monkeypatch):
    with pytest.raises(ValueError, match="must use https"):
        AdlsSink.from_uri(
            "abfss://bronze@acct.dfs.core.windows.net/x",
            auth="default_credential",
            endpoint="http://storage.example.com/acct",
        )
    with pytest.raises(ValueError, match="not an ADLS Gen2 URI"):
        AdlsSink.from_uri("abfss://bronze/acct")


@pytest.mark.parametrize(
    "connection_string",
    [
        f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={ACCOUNT_KEY};"
        "BlobEndpoint=http://storage.example.com/acct",
        f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={ACCOUNT_KEY};"
        "EndpointSuffix=core.windows.net",
    ],
    ids=["BlobEndpoint", "DefaultEndpointsProtocol"],
)
def test_plain_http_from_a_connection_string_is_refused(monkeypatch, connection_string):
    """The rule applies to the URL the client will call, wherever it came from."""
    monkeypatch.setenv("PG_ASSETS_TEST_SECRET", connection_string)
    with pytest.raises(ValueError, match="must use https") as err:
        AdlsSink.from_uri(ROOT, auth="connection_string", secret_env="PG_ASSETS_TEST_SECRET")
    assert ACCOUNT_KEY not in str(err.value)


@pytest.mark.parametrize("max_retries, succeeds", [(5, True), (4, True), (3, False)])
def test_max_retries_applies_to_server_errors(adls, monkeypatch, max_retries, succeeds):
    """503 four times: five attempts are needed. The SDK's default policy stops status
    retries at three whatever retry_total says."""
    sink = key_sink(adls, monkeypatch=monkeypatch, max_retries=max_retries)
    adls.faults.append(Fault("append", status=503, code="ServerBusy", times=4))
    if succeeds:
        sink.write_bytes("r", "a/f.bin", b"x" * 100, "application/octet-stream")
        assert adls.files("bronze")["x/a/f.bin"] == b"x" * 100
    else:
        with pytest.raises(AdlsError, match="HTTP 503 ServerBusy"):
            sink.write_bytes("r", "a/f.bin", b"x" * 100, "application/octet-stream")
        assert "x/a/f.bin" not in adls.files("bronze")
    assert len(adls.ops("append")) == min(5, max_retries + 1)


@pytest.mark.parametrize("max_retries", [0, 3, 6])
def test_max_retries_applies_to_lost_connections(adls, monkeypatch, max_retries):
    """Responses lost max_retries times in a row are recovered on the last attempt; one
    more and the request fails."""
    sink = key_sink(adls, monkeypatch=monkeypatch, max_retries=max_retries)
    sink.write_bytes("r", "a/f.bin", b"abc", "application/octet-stream")
    before = len(adls.ops("props"))
    adls.faults.append(Fault("props", mode="lost", times=max_retries))
    assert sink.stat("a/f.bin").size == 3
    assert len(adls.ops("props")) - before == max_retries + 1

    adls.faults.append(Fault("props", mode="lost", times=max_retries + 1))
    with pytest.raises(AdlsError, match="ADLS properties of x/a/f.bin failed"):
        sink.stat("a/f.bin")
    assert len(adls.ops("props")) - before == 2 * (max_retries + 1)


def test_retry_waits_are_the_documented_ones():
    """First retry waits retry_backoff_s, then × retry_backoff_base each time, ± 20 %."""
    policy = RetryPolicy(max_retries=5, backoff_s=2.0, base=3.0)
    assert [policy.nominal_wait(n) for n in (1, 2, 3, 4)] == [2.0, 6.0, 18.0, 54.0]
    for n, nominal in ((1, 2.0), (2, 6.0), (3, 18.0)):
        waits = [policy.get_backoff_time({"count": n}) for _ in range(200)]
        assert all(0.8 * nominal <= w <= 1.2 * nominal for w in waits)
    assert RetryPolicy(5, 0.0, 2.0).get_backoff_time({"count": 3}) == 0

"""The sinks under faults, through their public API: the real Azure SDK against the loopback
test server (failures and lost responses injected per request type), and the local
filesystem. After any single failed or lost request the caller is told the truth (success
or an exception) and the store holds exactly what that answer implies."""

import hashlib
import os
import threading
import time

import pytest

from pg_assets.sinks.adls import AdlsError, AdlsSink
from pg_assets.sinks.base import PublishUncertain, SinkError, SizeMismatch
from pg_assets.sinks.local import LocalSink
from pg_assets_tests.adls_server import Fault
from pg_assets_tests.conftest import ACCOUNT_KEY

ROOT = "abfss://bronze@devstoreaccount1.dfs.core.windows.net/lake"
OLD, NEW = b"old version " * 1000, b"new version!" * 1000  # same size, other bytes
PATH = "src/s.t/date=2026-10-01/t.csv.gz"


def adls_sink(server, monkeypatch, max_retries: int) -> AdlsSink:
    monkeypatch.setenv("PG_ASSETS_TEST_KEY", ACCOUNT_KEY)
    return AdlsSink.from_uri(ROOT, auth="account_key", secret_env="PG_ASSETS_TEST_KEY",
                             endpoint=server.url, create_filesystem=True,
                             max_retries=max_retries, retry_backoff_s=0)  # fmt: skip


def held(server, relpath: str = PATH) -> bytes | None:
    return server.files("bronze").get(f"lake/{relpath}")


def assert_no_staging(server) -> None:
    assert [p for p in server.files("bronze") if "_staging" in p] == []
    assert "lake/_staging" not in server.directories["bronze"]


def publish(sink, data: bytes = NEW):
    staging = sink.open_staging("run", PATH, "application/gzip")
    try:
        for i in range(0, len(data), 4096):  # several appends
            staging.write(data[i : i + 4096])
        return sink.publish(staging, PATH, expected_size=len(data))
    except BaseException:
        sink.discard(staging)
        raise


# For a publish over an existing file: does the caller see success, and does the store
# then hold the new version (success) or still the old one (failure)?
PUBLISH_OUTCOMES = {
    # op, mode, retries: succeeds
    ("create", "fail", 0): False,
    ("create", "lost", 0): False,  # the staging file exists, unanswered: fail, clean it up
    ("create", "lost", 2): True,  # the SDK's retry recreates it
    ("append", "fail", 0): False,
    ("append", "lost", 0): False,  # uncommitted data cannot be checked: fail
    ("append", "lost", 2): False,  # the retry lands at a stale position: fail
    ("flush", "fail", 0): False,
    ("flush", "lost", 0): True,  # recognised: the staging file holds the flushed bytes
    ("flush", "lost", 2): True,  # the retried flush at the same position is idempotent
    ("rename", "fail", 0): False,
    ("rename", "lost", 0): True,  # recognised: staging gone, destination holds the bytes
    ("rename", "lost", 2): True,  # the retry's 404 SourcePathNotFound is recognised too
}


@pytest.mark.parametrize("op, mode, retries", list(PUBLISH_OUTCOMES), ids=str)
def test_publish_under_a_failed_or_lost_request(adls, monkeypatch, op, mode, retries):
    sink = adls_sink(adls, monkeypatch, retries)
    publish(sink, OLD)
    adls.faults.append(Fault(op, mode=mode, times=1))
    if PUBLISH_OUTCOMES[op, mode, retries]:
        published = publish(sink)
        assert held(adls) == NEW
        assert published.size == len(NEW)
        assert published.etag == adls.filesystems["bronze"][f"lake/{PATH}"].etag
    else:
        with pytest.raises(AdlsError) as err:
            publish(sink)
        assert not isinstance(err.value, PublishUncertain)  # definitely not published
        assert f"lake/{PATH}" in str(err.value)  # names the destination
        assert held(adls) == OLD
    assert adls.faults[0].hits == 1
    assert_no_staging(adls)


@pytest.mark.parametrize("mode, retries", [("fail", 0), ("lost", 0), ("lost", 2)])
def test_delete_under_a_failed_or_lost_request(adls, monkeypatch, mode, retries):
    sink = adls_sink(adls, monkeypatch, retries)
    publish(sink, OLD)
    adls.faults.append(Fault("delete", mode=mode, times=1))
    if mode == "fail":
        with pytest.raises(AdlsError, match="HTTP 500 InternalError"):
            sink.delete(PATH)
        assert held(adls) == OLD
    else:
        sink.delete(PATH)  # the delete happened; its answer was lost
        assert held(adls) is None
    assert adls.faults[0].hits == 1
    sink.delete(PATH)  # deleting what is not there is fine


def test_write_bytes_under_a_lost_rename(adls, monkeypatch):
    """Manifests go through write_bytes: the same recognition applies."""
    sink = adls_sink(adls, monkeypatch, 0)
    adls.faults.append(Fault("rename", mode="lost", times=1))
    published = sink.write_bytes("run", "a/_manifest.json", b'{"v": 2}', "application/json")
    assert published.size == 8 and held(adls, "a/_manifest.json") == b'{"v": 2}'
    assert_no_staging(adls)


def test_unverifiable_lost_rename_is_reported_as_uncertain(adls, monkeypatch):
    """The rename's answer is lost and the checks fail too: the caller must not be told
    the old version stands, because it may not."""
    sink = adls_sink(adls, monkeypatch, 0)
    publish(sink, OLD)
    adls.faults.append(Fault("rename", mode="lost", times=1))
    adls.faults.append(Fault("props", status=503, code="ServerBusy", path=f"bronze/lake/{PATH}"))
    with pytest.raises(PublishUncertain, match="checking what the service holds failed too"):
        publish(sink)


def test_folder_created_once_and_again_if_deleted_meanwhile(adls, monkeypatch):
    """A DFS rename needs its destination's parent: created once per folder, not per file;
    if another process removed it since, the rename's 404 leads to creating it again."""
    sink = adls_sink(adls, monkeypatch, 0)
    sink.write_bytes("run", "d/a.json", b"1", "application/json")
    sink.write_bytes("run", "d/b.json", b"2", "application/json")
    assert len(adls.ops("mkdir")) == 1
    for p in [p for p in adls.filesystems["bronze"] if p.startswith("lake/d/")]:
        del adls.filesystems["bronze"][p]
    adls.directories["bronze"].discard("lake/d")
    sink.write_bytes("run", "d/c.json", b"3", "application/json")
    assert held(adls, "d/c.json") == b"3"
    assert len(adls.ops("mkdir")) == 2
    assert [r[2] for r in adls.ops("rename")][-2:] == ["bronze/lake/d/c.json"] * 2


# -- size checks, stat, open_read, staging folder: both sinks ----------------------------


@pytest.fixture(params=["local", "adls"])
def sink(request, tmp_path, monkeypatch):
    if request.param == "local":
        yield LocalSink(tmp_path / "bronze")
        return
    server = request.getfixturevalue("adls")
    sink = adls_sink(server, monkeypatch, 0)
    sink.server = server
    yield sink


def test_publish_refuses_a_size_mismatch(sink):
    publish(sink, OLD)
    staging = sink.open_staging("run", PATH, "application/gzip")
    staging.write(NEW)
    with pytest.raises(SizeMismatch) as err:
        sink.publish(staging, PATH, expected_size=len(NEW) + 1)
    message = str(err.value)
    assert PATH in message and staging.relpath in message
    assert f"{len(NEW):,} bytes" in message and f"{len(NEW) + 1:,} were written" in message
    sink.discard(staging)
    assert b"".join(sink.open_read(PATH)) == OLD
    assert [p for p in sink.list_files() if "_staging" in p] == []


def test_stat_and_open_read(sink):
    big = os.urandom(9 << 20)  # more than two 4 MiB reads
    sink.write_bytes("run", "d/big.bin", big, "application/octet-stream")
    info = sink.stat("d/big.bin")
    assert info is not None and info.size == len(big)
    chunks = list(sink.open_read("d/big.bin"))
    assert b"".join(chunks) == big
    assert len(chunks) >= 3 and max(len(c) for c in chunks) <= 4 << 20
    assert sink.stat("d/missing.bin") is None
    assert sink.stat("d") is None  # a folder is not a file
    with pytest.raises(FileNotFoundError):
        sink.open_read("d/missing.bin")
    with pytest.raises(FileNotFoundError):
        sink.read_bytes("d/missing.bin")
    if isinstance(sink, AdlsSink):
        assert info.etag and info.content_md5 == hashlib.md5(big).digest()
        assert sink.server.max_response <= 4 << 20  # each request reads at most 4 MiB


def test_staging_folder_is_removed_only_when_empty(sink):
    other = sink.open_staging("other-run", "x/y.bin", "application/octet-stream")
    other.write(b"still being written")
    sink.write_bytes("run", "d/a.json", b"{}", "application/json")
    assert [p for p in sink.list_files("_staging")] == [other.relpath]  # kept for the other
    assert sink.publish(other, "x/y.bin", expected_size=19).size == 19
    assert sink.list_files("_staging") == []
    if isinstance(sink, LocalSink):
        assert not (sink.root / "_staging").exists()
    staging = sink.open_staging("run", "d/b.json", "application/json")
    staging.write(b"half")
    sink.discard(staging)
    assert sink.list_files() == ["d/a.json", "x/y.bin"]
    if isinstance(sink, LocalSink):
        assert not (sink.root / "_staging").exists()


def age(sink, relpath: str, seconds: float) -> None:
    """Make the store report `relpath` as last modified `seconds` ago."""
    when = time.time() - seconds
    if isinstance(sink, LocalSink):
        os.utime(sink.root / relpath, (when, when))
    else:
        sink.server.set_modified("bronze", f"lake/{relpath}", when)


def test_sweep_removes_staging_files_older_than_the_age_and_nothing_younger(sink):
    """A killed run's staging files (one flushed, one created and never flushed) are removed
    once older than the age; a file just under it, and one another run is writing right now,
    stay, and that run still publishes."""
    day = 24 * 3600
    assert sink.sweep_staging(day) == []  # no _staging at all
    killed = []
    for name, flush in (("d/a.csv.gz", True), ("d/b.csv.gz", False)):
        staging = sink.open_staging("killed-run", name, "application/gzip")
        staging.write(b"x" * 1000)
        if flush:
            staging.close()
        killed.append(staging.relpath)
        age(sink, staging.relpath, day + 60)
    recent = sink.open_staging("recent-run", "d/c.csv.gz", "application/gzip")
    recent.write(b"y" * 1000)
    recent.close()
    age(sink, recent.relpath, day - 60)
    writing = sink.open_staging("live-run", "d/d.csv.gz", "application/gzip")
    writing.write(b"z" * 1000)
    assert sorted(sink.sweep_staging(day)) == sorted(killed)
    assert sorted(sink.list_files("_staging")) == sorted([recent.relpath, writing.relpath])
    writing.write(b"z" * 1000)
    assert sink.publish(writing, "d/d.csv.gz", expected_size=2000).size == 2000
    assert sink.sweep_staging(day) == []
    assert sink.list_files() == [recent.relpath, "d/d.csv.gz"]
    assert sink.sweep_staging(60) == [recent.relpath]  # a shorter age takes it too
    assert sink.list_files() == ["d/d.csv.gz"]
    if isinstance(sink, LocalSink):
        assert not (sink.root / "_staging").exists()


def test_failed_staging_create_names_the_destination(adls, monkeypatch):
    sink = adls_sink(adls, monkeypatch, 0)
    adls.faults.append(Fault("create", status=409, code="PathConflict"))
    with pytest.raises(SinkError) as err:
        sink.write_bytes("run", "d/_manifest.json", b"{}", "application/json")
    message = str(err.value)
    assert message.startswith("ADLS create of lake/d/_manifest.json failed")
    assert "staging file lake/_staging/run-" in message and "HTTP 409 PathConflict" in message


@pytest.mark.parametrize("op", ["append", "flush", "rename"])
def test_a_service_that_stops_answering_fails_the_publish(adls, monkeypatch, op):
    """No request waits forever: the read timeout (timeout_s) ends it, retries included,
    and the caller gets the error with the previous version in place."""
    monkeypatch.setenv("PG_ASSETS_TEST_KEY", ACCOUNT_KEY)
    sink = AdlsSink.from_uri(ROOT, auth="account_key", secret_env="PG_ASSETS_TEST_KEY",
                             endpoint=adls.url, create_filesystem=True, max_retries=1,
                             retry_backoff_s=0, timeout_s=1)  # fmt: skip
    publish(sink, OLD)
    adls.faults.append(Fault(op, mode="hang", delay=20))
    outcome: dict = {}

    def attempt() -> None:
        try:
            publish(sink)
        except BaseException as e:
            outcome["error"] = e

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the publish is still waiting for the service"
    assert isinstance(outcome.get("error"), AdlsError)
    assert "Timeout" in str(outcome["error"]) or "timed out" in str(outcome["error"])
    assert held(adls) == OLD
    assert adls.faults[0].hits == 2  # the first attempt and its one retry

"""The path a new user walks, from a fresh project folder with no environment set:
`pg-assets check` right after the quick start uses the embedded server (as demo and dev do);
a backgrounded `pg-assets dev` stops, webserver and daemon included, on SIGINT and on SIGTERM;
Dagster's own files stay out of the project folder."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from pg_assets_tests.dagster_dev import ROOT, free_port

PG_ASSETS = str(Path(sys.executable).parent / "pg-assets")
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("PG_ASSETS_CONNINFO", "PG_ASSETS_CONFIG", "DAGSTER_HOME", "PG_ASSETS_STATE_DIR")
}


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder laid out like a clone (dagster.yaml, workspace.yaml), nothing running yet."""
    folder = tmp_path_factory.mktemp("new_user")
    for name in ("dagster.yaml", "workspace.yaml"):
        shutil.copy(ROOT / name, folder / name)
    yield folder
    subprocess.run([PG_ASSETS, "stop"], cwd=folder, env=CLEAN_ENV, timeout=120)


def test_check_after_quick_start_uses_the_embedded_server(project_dir):
    out = subprocess.run(
        [PG_ASSETS, "check"], cwd=project_dir, env=CLEAN_ENV, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for table in ("public.orders", "public.events", "public.customers"):
        assert f"{table}: ok" in out.stdout
    assert "PostgreSQL ready" in out.stdout and "pg-assets stop" in out.stdout


def _pids(log: Path, timeout_s: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        m = re.search(r"webserver pid (\d+), daemon pid (\d+)", text)
        if m:
            return int(m.group(1)), int(m.group(2))
        time.sleep(0.2)
    raise AssertionError(f"pg-assets dev did not start:\n{log.read_text(errors='replace')}")


def _gone(pgid: int, timeout_s: float = 15) -> bool:
    """Nothing left of the group a child led (killed members may need a moment to be reaped
    by init once their parent is gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_backgrounded_dev_stops_cleanly(project_dir, sig):
    port = free_port()
    log = project_dir / f"dev-{sig.name}.log"
    # `&` in a non-interactive shell: the job starts with SIGINT ignored, as from a script
    shell = subprocess.Popen(
        ["bash", "-c", f"{PG_ASSETS} dev --port {port} > {log} 2>&1 & echo $!; wait $!"],
        cwd=project_dir, env=CLEAN_ENV, stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        pid = int(shell.stdout.readline())  # type: ignore[union-attr]
        webserver, daemon = _pids(log, 300)
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
        os.kill(pid, sig)
        assert shell.wait(90) == 0, log.read_text(errors="replace")
        for child in (webserver, daemon):
            assert _gone(child), f"process group {child} still running after {sig.name}"
        text = log.read_text(errors="replace")
        assert f"received {sig.name}: webserver and daemon stopped" in text
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait(10)
    # Dagster's own files went to DAGSTER_HOME under .pg_assets, not the project folder
    for name in (".nux", "logs", ".logs_queue", "history", "storage"):
        assert not (project_dir / name).exists(), name
    assert (project_dir / ".pg_assets" / "dagster" / "dagster.yaml").resolve() == (
        project_dir / "dagster.yaml"
    )

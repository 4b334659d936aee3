"""A Dagster webserver and daemon as child processes that always stop.

`pg-assets dev`, the tests and the backfill benchmark all need the same thing: the real
`dagster-webserver` and `dagster-daemon run` against one instance, so that backfills go through
the daemon's run queue, pools and concurrency limits exactly as in a deployment, and both
processes stop when we say so.

Why not `os.execv` into `dagster dev` (what `pg-assets dev` did): a shell starts a background
job with SIGINT ignored, an ignored signal survives `exec`, and `dagster dev` only stops on
KeyboardInterrupt; SIGTERM killed it without stopping its webserver and daemon. Here each child
starts with SIGINT restored to its default (so Python turns it into KeyboardInterrupt, which is
how both commands shut down cleanly), in its own session, and `stop()` interrupts both, waits a
bounded time, then kills what is left of each process group (code servers and runs included).
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

BIN = Path(sys.executable).parent


class ServicesError(RuntimeError):
    """The webserver or the daemon did not come up (the message says which and why)."""


def _child_signals() -> None:
    # Runs in the child between fork and exec: a background shell job inherits SIGINT ignored,
    # and an ignored signal stays ignored across exec. Restore the default so Python installs
    # its KeyboardInterrupt handler in dagster-webserver / dagster-daemon.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class DagsterServices:
    """`dagster-webserver` and `dagster-daemon run` on one instance (DAGSTER_HOME).

    Start them separately when it matters: a backfill created before the daemon's first
    iteration is picked up at once, instead of at its next 30-second loop.
    With `log_dir`, each writes its output to a file there (tests, benchmark); without, they
    share this process's stdout/stderr (`pg-assets dev`).
    """

    def __init__(
        self,
        *,
        cwd: Path,
        dagster_home: Path,
        workspace: Path,
        host: str = "127.0.0.1",
        port: int = 3000,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.cwd, self.workspace, self.log_dir = cwd, workspace, log_dir
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.env = {**os.environ, **(env or {}), "DAGSTER_HOME": str(dagster_home)}
        self.webserver: subprocess.Popen[Any] | None = None
        self.daemon: subprocess.Popen[Any] | None = None
        self._logs: list[IO[Any]] = []
        self._initialized = False

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[Any]:
        out: IO[Any] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed by stop()
            self._logs.append(out)
        return subprocess.Popen(
            argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
            preexec_fn=_child_signals,  # only resets two signal dispositions
        )

    def _init_instance(self) -> None:
        """Create (and migrate) the instance's storage once, before any service starts.

        On a fresh DAGSTER_HOME the webserver, the daemon and their code servers would each
        create the SQLite storage at the same moment, and Dagster's schema stamping can then
        fail with "Version table 'alembic_version' has more than one head present"."""
        if self._initialized:
            return
        code = "from dagster import DagsterInstance; DagsterInstance.get().dispose()"
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=self.cwd, env=self.env, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        if out.returncode != 0:
            raise ServicesError(f"could not open the Dagster instance: {out.stderr[-2000:]}")
        self._initialized = True

    def start_webserver(self) -> "DagsterServices":
        self._init_instance()
        argv = [str(BIN / "dagster-webserver"), "-w", str(self.workspace)]
        self.webserver = self._spawn("webserver", argv + ["-h", self.host, "-p", str(self.port)])
        return self

    def start_daemon(self) -> "DagsterServices":
        self._init_instance()
        argv = [str(BIN / "dagster-daemon"), "run", "-w", str(self.workspace)]
        self.daemon = self._spawn("daemon", argv)
        return self

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        return [p for p in (self.webserver, self.daemon) if p is not None]

    def check_alive(self) -> None:
        for name, proc in (("dagster-webserver", self.webserver), ("dagster-daemon", self.daemon)):
            if proc is not None and proc.poll() is not None:
                raise ServicesError(f"{name} exited with code {proc.returncode}")

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Until the webserver answers GraphQL and, if started, the daemon's run queue and
        backfill loops have reported healthy."""
        import requests

        deadline = time.monotonic() + timeout_s
        query = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }"
        while True:
            self.check_alive()
            try:
                r = requests.post(f"{self.url}/graphql", json={"query": query}, timeout=5)
                if r.ok:
                    statuses = r.json()["data"]["instance"]["daemonHealth"]["allDaemonStatuses"]
                    healthy = {s["daemonType"] for s in statuses if s["healthy"]}
                    if self.daemon is None or {"BACKFILL", "QUEUED_RUN_COORDINATOR"} <= healthy:
                        return
            except (requests.RequestException, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise ServicesError(
                    f"dagster-webserver/daemon not ready after {timeout_s:.0f} s at {self.url}"
                )
            time.sleep(0.5)

    def stop(self, timeout_s: float = 30) -> None:
        """Interrupt both (their clean shutdown), then kill whatever is left of each group."""
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.processes:
            # Each child leads its own session: its code servers and launched runs are in its
            # process group. Anything still there after a clean shutdown is ours to kill.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "DagsterServices":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

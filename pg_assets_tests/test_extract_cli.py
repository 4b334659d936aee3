"""`python -m pg_assets.core.extract`: bad input ends in one line naming what is wrong."""

import subprocess
import sys

import pytest

BASE = ["--table", "public.t", "--column", "d", "--day", "2026-10-01", "--root", "/tmp/x"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pg_assets.core.extract", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


@pytest.mark.parametrize(
    "override,fragment",
    [
        (["--timezone", "Mars/Base"], "--timezone 'Mars/Base' is not a known time zone"),
        (["--day", "2026-13-01"], "--day '2026-13-01' is not a date"),
        (["--table", "public.t; DROP TABLE x"], "unexpected ';' at position 8"),
        (["--codec", "lz4"], "unknown codec 'lz4'"),
        (
            ["--conninfo-env", "PG_ASSETS_NOT_SET"],
            "environment variable PG_ASSETS_NOT_SET is not set",
        ),
    ],
)
def test_bad_input_is_one_line(override, fragment):
    args = list(BASE)
    for i in range(0, len(override), 2):
        if override[i] in args:
            args[args.index(override[i]) + 1] = override[i + 1]
        else:
            args += override[i : i + 2]
    out = run(*args)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert fragment in out.stderr and "Traceback" not in out.stderr


def test_missing_table_names_it(pg_conninfo, tmp_path):
    import os

    out = run(*BASE[:-1], str(tmp_path), "--table", "public.nope",
              env={**os.environ, "PG_ASSETS_CONNINFO": pg_conninfo})  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        out.stderr == "error: table public.nope does not exist (or is not visible to this role)\n"
    )


def test_help_describes_every_option():
    out = run("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for described in (
        "--table TABLE schema.table",
        "--day DAY the day to extract",
        "--root ROOT Bronze root",
        "--lock-timeout-s LOCK_TIMEOUT_S how long to wait",
    ):
        assert described in text

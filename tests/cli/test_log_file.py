"""``-E FILE``: the log file pytunnel writes (hosts, users, clients) is created for its
owner alone, whatever the umask; an existing file is appended to, as ssh -E does, and
keeps the mode its owner gave it.

The real console script runs against a closed port: it opens the log, says it is
connecting, fails and exits 255.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.pytunnel_proc import Finished, run_pytunnel


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The umask most shells start with: without care, files come out world-readable."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def run_logging_to(log_file: Path, closed_port: int) -> Finished:
    args = ["-E", str(log_file), "-D", "127.0.0.1:0", "-F", "none", "-o", "ConnectTimeout=10"]
    result = run_pytunnel([*args, "-p", str(closed_port), "127.0.0.1"])
    assert result.returncode == 255, result.describe()
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("permissive_umask")
def test_a_new_log_file_is_private(tmp_path: Path, closed_port: int) -> None:
    log_file = tmp_path / "pytunnel.log"
    run_logging_to(log_file, closed_port)
    assert "connecting to" in log_file.read_text()
    assert mode(log_file) == 0o600


@pytest.mark.usefixtures("permissive_umask")
@pytest.mark.parametrize("existing_mode", [0o644, 0o600, 0o640])
def test_an_existing_log_file_is_appended_to_and_keeps_its_mode(
    tmp_path: Path, closed_port: int, existing_mode: int
) -> None:
    log_file = tmp_path / "pytunnel.log"
    log_file.write_text("an earlier run\n")
    log_file.chmod(existing_mode)
    run_logging_to(log_file, closed_port)
    text = log_file.read_text()
    assert text.startswith("an earlier run\n")
    assert "connecting to" in text
    assert mode(log_file) == existing_mode

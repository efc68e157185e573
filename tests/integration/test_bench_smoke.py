"""bench/run.py still runs: one tiny pass with pytunnel alone. No timing is asserted here;
performance is measured (not tested) by running the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.sshd import SSHD_PATH, sshd_available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

RUN = Path(__file__).resolve().parents[2] / "bench" / "run.py"
SMOKE_ARGS = [
    "--quick", "--only", "pytunnel", "--rounds", "1", "--size", "2",
    "--setups", "10", "--conc", "5", "--open", "20",
]  # fmt: skip


def test_bench_quick_run_prints_a_table(tmp_path: Path) -> None:
    if not sshd_available():
        pytest.skip(f"OpenSSH server not installed ({SSHD_PATH} missing)")
    samples = tmp_path / "samples.json"
    done = subprocess.run(
        [sys.executable, str(RUN), *SMOKE_ARGS, "--json", str(samples)],
        capture_output=True,
        text=True,
        timeout=75,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| metric | pytunnel |" in done.stdout
    assert "Negotiated cipher: pytunnel `" in done.stdout
    record = json.loads(samples.read_text())
    assert {r["setting"] for r in record["rounds"]} == {"default", "same"}
    same = next(r for r in record["rounds"] if r["setting"] == "same")
    assert same["results"]["pytunnel"]["cipher"] == "aes128-gcm@openssh.com"


def test_udp_bench_runs_every_subject() -> None:
    if not sshd_available():
        pytest.skip(f"OpenSSH server not installed ({SSHD_PATH} missing)")
    done = subprocess.run(
        [sys.executable, str(RUN.with_name("udp.py")), "--rounds", "1", "--queries", "5"],
        capture_output=True,
        text=True,
        timeout=75,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| ssh -D, DNS over TCP, CONNECT per query",
        "| pytunnel -D, DNS over TCP, CONNECT per query",
        "| pytunnel UDP ASSOCIATE, DNS (one channel)",
        "| pytunnel UDP ASSOCIATE, echo via --udp-helper",
    ]


def test_master_subjects_run_in_every_mode() -> None:
    if not sshd_available():
        pytest.skip(f"OpenSSH server not installed ({SSHD_PATH} missing)")
    args = [*SMOKE_ARGS, "--settings", "default"]
    args[args.index("pytunnel")] = "pytunnel-master,pytunnel-master-stdio,pytunnel-master-proxy"
    done = subprocess.run(
        [sys.executable, str(RUN), *args], capture_output=True, text=True, timeout=75, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("| metric |"))
    assert "--master-mode proxy" in header
    assert "--master-mode stdio" in header
    assert header.count("pytunnel via ssh -M master") == 3
    rows = [line.split(" | ")[0] for line in done.stdout.splitlines() if line.startswith("| ")]
    assert "| download, 1 connection × 2 MiB (MiB/s)" in rows


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """One tiny run of another bench script, which must exit 0."""
    if not sshd_available():
        pytest.skip(f"OpenSSH server not installed ({SSHD_PATH} missing)")
    done = subprocess.run(
        [sys.executable, str(RUN.with_name(name)), *args],
        capture_output=True,
        text=True,
        timeout=75,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _rows(stdout: str, cells: int) -> list[list[str]]:
    return [line.split(" | ")[:cells] for line in stdout.splitlines() if line.startswith("| ")]


def test_workers_bench_runs_every_layout() -> None:
    done = _script("workers.py", "--rounds", "1", "--setups", "5", "--size", "1", "--flows", "1")
    assert _rows(done.stdout, 1)[1:] == [
        ["| ssh -D"],
        ["| pytunnel, 1 process(es)"],
        ["| pytunnel, 2 process(es)"],
    ]


def test_flows_bench_compares_each_subject_with_the_first() -> None:
    done = _script("flows.py", "--only", "ssh,pytunnel-master", "--rounds", "2", "--size", "1")
    assert _rows(done.stdout, 1)[1:] == [["| ssh"], ["| pytunnel-master"]]
    assert "pytunnel-master / ssh: download " in done.stdout


def test_liveview_bench_reads_both_subjects() -> None:
    done = _script(
        "liveview.py", "--rounds", "1", "--seconds", "0.5", "--connections", "0,3",
        "--stream", "0,4",
    )  # fmt: skip
    assert _rows(done.stdout, 2)[1:] == [["| 0", "0"], ["| 0", "4"], ["| 3", "0"], ["| 3", "4"]]
    assert "round 1, 3 connections, stream 4 MiB/s: plain" in done.stderr


@pytest.mark.parametrize(
    "script",
    ["run.py", "udp.py", "connections.py", "recovery.py", "workers.py", "liveview.py", "flows.py"],
)
def test_bench_help_prints(script: str) -> None:
    """--help renders every option's text (a bare % in one made argparse raise)."""
    done = subprocess.run(
        [sys.executable, str(RUN.with_name(script)), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout

"""The programs under test, each its own process, and what /proc says about them.

Every process is started with a deadline on its readiness, watched by PID, and stopped
by PID (SIGTERM, then SIGKILL). Their stdout and stderr go to files in the work
directory: nothing in the benchmark has to drain a pipe while it measures.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import socks_client

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
PYTUNNEL = str(Path(sys.executable).with_name("pytunnel"))
SSH = "ssh"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Nothing from the caller's environment may steer a subject elsewhere (agent, proxies).
_SCRUBBED_ENV = ("SSH_AUTH_SOCK", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy",
                 "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")  # fmt: skip


class SubjectError(RuntimeError):
    """A subject did not start, or died."""


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_parent() -> None:
    """preexec hook: if the benchmark dies, its children get SIGTERM instead of
    living on with listeners open."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def spawn(
    argv: list[str],
    workdir: Path,
    name: str,
    *,
    stderr_fd: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``argv`` in its own session (no controlling terminal, so nothing can prompt
    on ours, and Ctrl-C reaches only the benchmark, which stops everyone by PID), with
    stdout in a file and stderr in a file or on ``stderr_fd``. Returns the process and
    the path of its stdout file."""
    out_path = workdir / f"{name}.out"
    err_path = workdir / f"{name}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err if stderr_fd is None else stderr_fd,
            env={**clean_env(), **(env or {})},
            cwd=workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return proc, out_path


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, SIGKILL after a deadline; always reaped."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(STOP_TIMEOUT)


def read_first_line(
    proc: subprocess.Popen[bytes], path: Path, timeout: float, what: str
) -> dict[str, Any]:
    """Wait (bounded) until the process has written its first line of JSON to ``path``."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace")
        if "\n" in text:
            return dict(json.loads(text.split("\n", 1)[0]))
        if proc.poll() is not None:
            raise SubjectError(f"{what} exited with status {proc.returncode} before ready")
        if time.monotonic() >= deadline:
            raise SubjectError(f"{what} not ready within {timeout:g} s")
        time.sleep(0.02)


def free_port() -> int:
    """A loopback port nothing listens on right now (racy: ssh may lose it; we retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- /proc --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which may contain spaces: state is field 3 overall,
    # utime and stime are fields 14 and 15.
    rest = stat[stat.rfind(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak so far) in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def _cpu_times() -> list[int]:
    # user nice system idle iowait irq softirq steal ...
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def machine_load(seconds: float = 1.0) -> dict[str, float]:
    """How busy all CPUs were over ``seconds``: a benchmark on a busy machine measures
    the machine, so the run records this before it starts."""
    before = _cpu_times()
    time.sleep(seconds)
    delta = [b - a for a, b in zip(before, _cpu_times(), strict=True)]
    total = sum(delta) or 1
    idle = delta[3] + delta[4]
    return {"busy": (total - idle) / total, "steal": delta[7] / total}


# -- subjects ------------------------------------------------------------------------


@dataclass
class Server:
    """Where the subjects connect: the private sshd."""

    host: str
    port: int
    user: str
    key: str
    known_hosts: str
    workdir: Path


@dataclass
class Subject:
    """One program under test. ``start`` returns once a SOCKS round trip works."""

    name: str
    server: Server
    cipher: str | None  # None: the program's own default
    echo_port: int
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    negotiated: str = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        """CPU of every process that does this subject's work."""
        return cpu_seconds(self.pid)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise SubjectError(f"{self.name} is not running (status {code})")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def _ready_roundtrip(self, deadline: float) -> None:
        """Bounded wait for the first SOCKS round trip through the tunnel."""
        while True:
            self.check_alive()
            try:
                socks_client.echo_once(self.port, self.echo_port, timeout=5.0)
                return
            except (OSError, socks_client.ClientError) as exc:
                if time.monotonic() >= deadline:
                    raise SubjectError(f"{self.name}: no SOCKS round trip: {exc}") from exc
                time.sleep(0.05)


def ssh_base_args(server: Server) -> list[str]:
    return [
        "-F", "/dev/null",
        "-i", server.key,
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={server.known_hosts}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
        "-p", str(server.port),
    ]  # fmt: skip


_SSH_CIPHER = re.compile(r"kex: server->client cipher: (\S+)")


def ssh_negotiated_cipher(server: Server, cipher: str | None) -> str:
    """What ``ssh`` negotiates with these options, from ``-v`` output of a one-shot
    login. A separate probe, so that the measured ``ssh -D`` runs without -v and does
    not pay for a debug line per channel."""
    argv = [SSH, "-v", *ssh_base_args(server)]
    if cipher:
        argv += ["-c", cipher]
    argv += [f"{server.user}@{server.host}", "true"]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, env=clean_env(), check=False
    )
    match = _SSH_CIPHER.search(out.stderr)
    return match.group(1) if match else "unknown"


class SshSubject(Subject):
    """OpenSSH's ``ssh -N -D``."""

    def start(self) -> None:
        for _ in range(5):
            self.port = free_port()
            argv = [SSH, "-N", "-D", f"127.0.0.1:{self.port}", *ssh_base_args(self.server)]
            # Exit rather than run without the listener if the port was taken meanwhile.
            argv += ["-o", "ExitOnForwardFailure=yes"]
            if self.cipher:
                argv += ["-c", self.cipher]
            argv.append(f"{self.server.user}@{self.server.host}")
            self.proc, _ = spawn(argv, self.server.workdir, f"{self.name}-{self.port}")
            try:
                self._ready_roundtrip(time.monotonic() + READY_TIMEOUT)
            except SubjectError:
                if self.proc.poll() is None:
                    raise
                err = (self.server.workdir / f"{self.name}-{self.port}.err").read_text()
                if "Address already in use" in err:
                    continue  # lost the race for the port: try another
                raise SubjectError(f"ssh exited: {err.strip()}") from None
            self.negotiated = ssh_negotiated_cipher(self.server, self.cipher)
            return
        raise SubjectError("ssh: no free port after 5 attempts")


class PytunnelSubject(Subject):
    """``pytunnel -D 127.0.0.1:0 --json``, stderr to a file: plain log lines, no live
    view."""

    def argv(self) -> list[str]:
        argv = [
            PYTUNNEL, "-D", "127.0.0.1:0", "--json", "-F", "none",
            "-i", self.server.key,
            "-o", f"UserKnownHostsFile={self.server.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-p", str(self.server.port),
        ]  # fmt: skip
        if self.cipher:
            argv += ["-o", f"Ciphers={self.cipher}"]
        return [*argv, f"{self.server.user}@{self.server.host}"]

    def start(self) -> None:
        self.proc, out = spawn(self.argv(), self.server.workdir, f"{self.name}-{time.time_ns()}")
        self._ready(out)

    def _ready(self, out: Path) -> None:
        assert self.proc is not None
        ready = read_first_line(self.proc, out, READY_TIMEOUT, self.name)
        if ready.get("event") != "ready":
            raise SubjectError(f"pytunnel's first line is not 'ready': {ready}")
        self.port = int(ready["listeners"][0]["port"])
        self.negotiated = str(ready.get("cipher", "unknown"))
        self._ready_roundtrip(time.monotonic() + READY_TIMEOUT)


class PytunnelLiveSubject(PytunnelSubject):
    """The same command with stderr on a pseudo-terminal, which turns pytunnel's live
    status view on (as in an interactive shell). A ``cat`` process drains the terminal
    so the view never blocks on a full buffer; it is stopped by PID with the subject."""

    COLUMNS, ROWS = 120, 40
    _drain: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        master, slave = os.openpty()
        try:
            winsize = struct.pack("HHHH", self.ROWS, self.COLUMNS, 0, 0)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize)
            name = f"{self.name}-{time.time_ns()}"
            self.proc, out = spawn(
                self.argv(),
                self.server.workdir,
                name,
                stderr_fd=slave,
                env={"TERM": "xterm-256color"},
            )
            self._drain = subprocess.Popen(
                ["cat"],
                stdin=master,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            os.close(slave)
            os.close(master)
        self._ready(out)

    def stop(self) -> None:
        super().stop()
        if self._drain is not None:
            stop_process(self._drain)


class AsyncsshSubject(Subject):
    """asyncssh's ``conn.forward_socks()`` in a small script (``asyncssh_socks.py``)."""

    loop = "uvloop"

    def start(self) -> None:
        argv = [
            PYTHON, str(BENCH_DIR / "asyncssh_socks.py"), self.server.host,
            "--port", str(self.server.port),
            "--user", self.server.user,
            "--key", self.server.key,
            "--known-hosts", self.server.known_hosts,
            "--loop", self.loop,
        ]  # fmt: skip
        if self.cipher:
            argv += ["--cipher", self.cipher]
        self.proc, out = spawn(argv, self.server.workdir, f"{self.name}-{time.time_ns()}")
        ready = read_first_line(self.proc, out, READY_TIMEOUT, self.name)
        self.port = int(ready["port"])
        self.negotiated = str(ready.get("cipher", "unknown"))
        self._ready_roundtrip(time.monotonic() + READY_TIMEOUT)


class PytunnelMasterSubject(PytunnelSubject):
    """pytunnel riding an ``ssh -M`` master (``-S``, no key of its own). CPU is
    pytunnel's and the master's together: the master does the cryptography."""

    master_pid: int = 0
    mode = "handover"  # the default

    def argv(self) -> list[str]:
        sock = self.server.workdir / f"{self.name}.sock"
        return [PYTUNNEL, "-D", "127.0.0.1:0", "--json", "-F", "none", "-S", str(sock),
                "--master-mode", self.mode, f"{self.server.user}@{self.server.host}"]  # fmt: skip

    def start(self) -> None:
        sock = self.server.workdir / f"{self.name}.sock"
        argv = [SSH, "-M", "-S", str(sock), "-o", "ControlPersist=no", "-N", "-f"]
        argv += ssh_base_args(self.server)
        if self.cipher:
            argv += ["-c", self.cipher]
        argv.append(f"{self.server.user}@{self.server.host}")
        subprocess.run(argv, timeout=30, env=clean_env(), check=True, stdin=subprocess.DEVNULL)
        check = subprocess.run(
            [SSH, "-S", str(sock), "-O", "check", "x"],
            capture_output=True, text=True, timeout=30, env=clean_env(), check=True,
        )  # fmt: skip
        self.master_pid = int(check.stderr.split("pid=")[1].split(")")[0])
        super().start()
        self.negotiated = ssh_negotiated_cipher(self.server, self.cipher)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid) + cpu_seconds(self.master_pid)

    def stop(self) -> None:
        super().stop()
        if self.master_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.master_pid, signal.SIGTERM)


class PytunnelMasterProxySubject(PytunnelMasterSubject):
    """The same master, channels in proxy mode (pytunnel frames the SSH packets)."""

    mode = "proxy"


class PytunnelMasterStdioSubject(PytunnelMasterSubject):
    """The same master, stdio mode (pytunnel relays both ways over a socket pair)."""

    mode = "stdio"


SUBJECTS: dict[str, type[Subject]] = {
    "ssh": SshSubject,
    "pytunnel": PytunnelSubject,
    "asyncssh": AsyncsshSubject,
    "pytunnel-live": PytunnelLiveSubject,
    "pytunnel-master": PytunnelMasterSubject,
    "pytunnel-master-proxy": PytunnelMasterProxySubject,
    "pytunnel-master-stdio": PytunnelMasterStdioSubject,
}

"""Happy Eyeballs against the real sshd: the server's name has an IPv6 address that
black-holes (a listener whose accept queue is full: the kernel drops further SYNs, no
RST) and the IPv4 loopback where sshd listens. The name comes from a private /etc/hosts
seen by pytunnel alone (``unshare --mount``); nothing reaches a resolver."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.pytunnel_proc import PYTUNNEL, run_pytunnel
from fixtures.sshd import SshdServer

NAME = "wake-dual.test"
WRAP = ["unshare", "--mount", "sh", "-c", 'mount --bind "$1" /etc/hosts && shift && exec "$@"']
# Far beyond the test's own deadline: reaching ready proves it was not waited out.
CONNECT_TIMEOUT = "3600"


@contextlib.contextmanager
def black_hole(port: int) -> Iterator[None]:
    """[::1]:port accepts nothing more: its accept queue is full, so SYNs are dropped."""
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            listener.bind(("::1", port))
        except OSError as exc:
            pytest.skip(f"cannot listen on [::1]:{port}: {exc}")
        listener.listen(0)
        # Fill the queue until a connect is no longer answered.
        for _ in range(8):
            filler = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.settimeout(2.0)
            try:
                filler.connect(("::1", port))
            except TimeoutError:
                break
        else:
            pytest.skip("the accept queue never filled")
        yield
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def hosts_prefix(tmp_path: Path) -> list[str]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private /etc/hosts")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"::1 {NAME}\n127.0.0.1 {NAME}\n")
    probe = subprocess.run(
        [*WRAP, "sh", str(hosts), "getent", "ahosts", NAME],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0 or "::1" not in probe.stdout or "127.0.0.1" not in probe.stdout:
        pytest.skip(f"cannot give pytunnel a private /etc/hosts: {probe.stderr.strip()}")
    return [*WRAP, "sh", str(hosts), str(PYTUNNEL)]


def args(sshd: SshdServer, *extra: str) -> list[str]:
    return [
        "-v",
        "-D", "0",
        "-F", "none",
        "-i", str(sshd.client_key),
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "GlobalKnownHostsFile=/dev/null",
        # The name is new to known_hosts; what is checked here is the route to it.
        "-o", "StrictHostKeyChecking=no",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
        "-p", str(sshd.port),
        *extra,
        f"{sshd.user}@{NAME}",
        "--", "true",
    ]  # fmt: skip


def tried(stderr: str) -> list[str]:
    return [line.split("trying ", 1)[1] for line in stderr.splitlines() if "trying " in line]


def test_black_holed_ipv6_loses_to_ipv4_without_waiting(sshd: SshdServer, tmp_path: Path) -> None:
    prefix = hosts_prefix(tmp_path)
    with black_hole(sshd.port):
        result = run_pytunnel(args(sshd), executable=prefix, timeout=100)
    assert result.returncode == 0, result.describe()
    port = sshd.port
    assert tried(result.stderr) == [f"::1 port {port}", f"127.0.0.1 port {port}"]
    assert f"connected to 127.0.0.1 port {port}" in result.stderr


def test_minus_4_tries_ipv4_only(sshd: SshdServer, tmp_path: Path) -> None:
    prefix = hosts_prefix(tmp_path)
    with black_hole(sshd.port):
        result = run_pytunnel(args(sshd, "-4"), executable=prefix, timeout=100)
    assert result.returncode == 0, result.describe()
    assert tried(result.stderr) == [f"127.0.0.1 port {sshd.port}"]

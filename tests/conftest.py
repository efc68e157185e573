"""Shared pytest fixtures for pytunnel: SSH servers and loopback targets.

Everything listens on loopback only. Heavy fixtures are session-scoped; the classes live in
``tests/fixtures`` so they stay importable without pytest.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

# pyproject's ``pythonpath = ["tests"]`` normally does this; keep a fallback so running a
# single file from another rootdir still finds the fixture package.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from fixtures.asyncssh_server import AsyncsshServer  # noqa: E402
from fixtures.keys import SshKeys, make_keys  # noqa: E402
from fixtures.net import LOOPBACK6, ipv6_loopback_available  # noqa: E402
from fixtures.sshd import SSHD_PATH, SshdServer, sshd_available  # noqa: E402
from fixtures.targets import (  # noqa: E402
    EchoTarget,
    HttpTarget,
    TalkerTarget,
    make_big_body,
)
from fixtures.targets import closed_port as _closed_port  # noqa: E402


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> SshKeys:
    return make_keys(tmp_path_factory.mktemp("ssh_keys"))


def _require_sshd() -> None:
    if not sshd_available():
        pytest.skip(f"OpenSSH server not installed ({SSHD_PATH} missing)")


@pytest.fixture(scope="session")
def sshd(ssh_keys: SshKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdServer]:
    """Session-wide real sshd; tests must not stop it (use ``make_sshd`` for that)."""
    _require_sshd()
    server = SshdServer(ssh_keys, tmp_path_factory.mktemp("sshd")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_sshd(
    ssh_keys: SshKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., SshdServer]]:
    """Factory for private sshd instances (ProxyJump hops, stop/restart tests)."""
    _require_sshd()
    started: list[SshdServer] = []

    def factory(**extra_options: str) -> SshdServer:
        server = SshdServer(ssh_keys, tmp_path_factory.mktemp("sshd_extra"), **extra_options)
        started.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def asyncssh_server(
    ssh_keys: SshKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AsyncsshServer]:
    server = AsyncsshServer(ssh_keys.client_key, tmp_path_factory.mktemp("asyncssh")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def big_body() -> bytes:
    # Built once and shared by the v4 and v6 HTTP targets (8 MiB each would add up).
    return make_big_body()


@pytest.fixture(scope="session")
def http_target(big_body: bytes) -> Iterator[HttpTarget]:
    target = HttpTarget(big_body=big_body)
    try:
        yield target
    finally:
        target.stop()


@pytest.fixture(scope="session")
def http_target6(big_body: bytes) -> Iterator[HttpTarget]:
    if not ipv6_loopback_available():
        pytest.skip("IPv6 loopback (::1) not available")
    target = HttpTarget(LOOPBACK6, big_body=big_body)
    try:
        yield target
    finally:
        target.stop()


@pytest.fixture(scope="session")
def echo_target() -> Iterator[EchoTarget]:
    target = EchoTarget()
    try:
        yield target
    finally:
        target.stop()


@pytest.fixture(scope="session")
def talker_target() -> Iterator[TalkerTarget]:
    target = TalkerTarget()
    try:
        yield target
    finally:
        target.stop()


@pytest.fixture(scope="session")
def curl() -> str:
    """The curl binary the interop tests drive; they skip where it is missing."""
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl not installed")
    return path


@pytest.fixture
def closed_port() -> int:
    # Function scope: a fresh probe per test keeps the "nothing listens" window short.
    return _closed_port()


# ==== pytunnel subprocess fixtures (tests/fixtures/pytunnel_proc.py) =======================
# Appended block: the real console script under test, against the servers above.

from fixtures.pytunnel_proc import PytunnelFactory, Running, server_args  # noqa: E402


@pytest.fixture
def pytunnel_factory() -> Iterator[PytunnelFactory]:
    """``start(args, **kw) -> Running``; every tunnel started is stopped by PID at teardown."""
    factory = PytunnelFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def tunnel(pytunnel_factory: PytunnelFactory, sshd: SshdServer) -> Running:
    """pytunnel -D 127.0.0.1:0 --json through the real OpenSSH sshd, ready to use."""
    return pytunnel_factory(["-D", "127.0.0.1:0", *server_args(sshd)])


@pytest.fixture
def tunnel_asyncssh(pytunnel_factory: PytunnelFactory, asyncssh_server: AsyncsshServer) -> Running:
    """pytunnel -D 127.0.0.1:0 --json through the in-process asyncssh server (magic ports)."""
    return pytunnel_factory(["-D", "127.0.0.1:0", *server_args(asyncssh_server)])


# ==== end of pytunnel subprocess fixtures ==================================================


def _uvloop_run(main: Awaitable[None]) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(main)


@pytest.fixture(params=["asyncio", "uvloop"])
def run_loop(request: pytest.FixtureRequest) -> Callable[[Awaitable[None]], None]:
    """Runs a test's coroutine under asyncio's own loop, then (the second case) under
    uvloop, which pytunnel runs on: their transports differ where it matters."""
    if request.param == "asyncio":
        return asyncio.run  # type: ignore[return-value]
    return _uvloop_run

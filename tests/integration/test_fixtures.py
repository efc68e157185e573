"""Self-tests for the shared fixtures, using real clients (ssh, curl, asyncssh, sockets)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from fixtures.asyncssh_server import (
    ALICE,
    FAILURES,
    OTP_CODE,
    OTP_INSTRUCTIONS,
    OTP_USER,
    PORT_DROP_CONNECTION,
    PORT_ECHO,
    PORT_NEVER_ANSWER,
    AsyncsshServer,
)
from fixtures.keys import SshKeys
from fixtures.net import free_port
from fixtures.sshd import SshdServer
from fixtures.targets import DRIP_BURST, DRIP_SIZE, EchoTarget, HttpTarget, TalkerTarget

pytestmark = pytest.mark.timeout(60)

CLIENT_TIMEOUT = 20.0
PRIVATE = 0o600


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed")
    return path


def _ssh(server: SshdServer, *remote: str) -> subprocess.CompletedProcess[str]:
    cmd = [_need("ssh"), *server.ssh_args(), f"{server.user}@{server.host}", *remote]
    return subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def _connect(server: AsyncsshServer, **kwargs: Any) -> Any:
    """asyncssh.connect with no agent, no ~/.ssh config or keys: only what the test passes."""
    options: dict[str, Any] = {
        "port": server.port,
        "known_hosts": server.known_hosts,
        "agent_path": None,
        "config": None,
        "username": "tester",
        "client_keys": [server.client_key],
        "connect_timeout": CLIENT_TIMEOUT,
    }
    options.update(kwargs)
    return asyncssh.connect(server.host, **options)


# -- keys / helpers ------------------------------------------------------------------------


def test_ssh_keys_are_private_ed25519(ssh_keys: SshKeys) -> None:
    for key in (ssh_keys.client_key, ssh_keys.host_key):
        assert stat.S_IMODE(key.stat().st_mode) == PRIVATE
    assert ssh_keys.client_pub_line.startswith("ssh-ed25519 ")
    assert ssh_keys.host_pub_line.startswith("ssh-ed25519 ")


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# -- real sshd -----------------------------------------------------------------------------


def test_sshd_accepts_client_key(sshd: SshdServer) -> None:
    mark = sshd.log_mark()
    result = _ssh(sshd, "true")
    assert result.returncode == 0, result.stderr + sshd.log_text(mark)
    assert sshd.wait_log("Accepted publickey", since=mark), sshd.log_text(mark)
    line = Path(sshd.known_hosts).read_text()
    assert line == f"[127.0.0.1]:{sshd.port} {sshd.host_key_pub}\n"


def test_sshd_children_track_connections(sshd: SshdServer) -> None:
    with socket.create_connection((sshd.host, sshd.port), timeout=5) as sock:
        assert sock.recv(64).startswith(b"SSH-2.0-")
        # One forked child per connection, visible while the connection lives.
        assert len(sshd.children()) >= 1


@pytest.mark.asyncio
async def test_sshd_direct_tcpip_reaches_target_and_is_logged(
    sshd: SshdServer, echo_target: EchoTarget
) -> None:
    mark = sshd.log_mark()
    async with asyncssh.connect(
        sshd.host,
        port=sshd.port,
        username=sshd.user,
        client_keys=[sshd.client_key],
        known_hosts=sshd.known_hosts,
        agent_path=None,
        config=None,
        connect_timeout=CLIENT_TIMEOUT,
    ) as conn:
        reader, writer = await conn.open_connection(echo_target.host, echo_target.port)
        payload = b"x" * 100_000
        writer.write(payload)
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
    assert reply == EchoTarget.expected_reply(payload)
    # DEBUG1 logs each direct-tcpip open: proof that the request went through this sshd.
    # (asyncssh sends an empty originator, so match only the target part.)
    needle = f"target {echo_target.host} port {echo_target.port}"
    assert sshd.wait_log(needle, since=mark), sshd.log_text(mark)
    assert "server_request_direct_tcpip" in sshd.log_text(mark)


def test_make_sshd_restarts_on_same_port(make_sshd: Any, sshd: SshdServer) -> None:
    server: SshdServer = make_sshd()
    assert server.port != sshd.port
    port, first_pid = server.port, server.pid
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        assert sock.recv(64).startswith(b"SSH-2.0-")
        server.stop()
        # kill_sessions=True (default) means established connections die with the server.
        sock.settimeout(5)
        assert sock.recv(64) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, port), timeout=2).close()
    server.start()
    assert (server.port, server.running) == (port, True)
    assert server.pid != first_pid
    assert _ssh(server, "true").returncode == 0


def test_make_sshd_extra_options(make_sshd: Any) -> None:
    server: SshdServer = make_sshd(AllowTcpForwarding="no")
    assert "AllowTcpForwarding no" in " ".join(server._command(server.port))
    assert "AllowTcpForwarding yes" not in " ".join(server._command(server.port))


# -- in-process asyncssh server ------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("port", sorted(FAILURES))
async def test_asyncssh_server_magic_failures(asyncssh_server: AsyncsshServer, port: int) -> None:
    code, reason = FAILURES[port]
    async with _connect(asyncssh_server) as conn:
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await conn.open_connection("127.0.0.1", port)
    assert (info.value.code, info.value.reason) == (code, reason)
    assert ("127.0.0.1", port) in asyncssh_server.requests_snapshot()


@pytest.mark.asyncio
async def test_asyncssh_server_echo_half_close(asyncssh_server: AsyncsshServer) -> None:
    async with _connect(asyncssh_server) as conn:
        reader, writer = await conn.open_connection("127.0.0.1", PORT_ECHO)
        payload = bytes(range(256)) * 8192  # 2 MiB, beyond the default window
        writer.write(payload)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
    assert echoed == payload


@pytest.mark.asyncio
async def test_asyncssh_server_never_answers(asyncssh_server: AsyncsshServer) -> None:
    async with _connect(asyncssh_server) as conn:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.open_connection("127.0.0.1", PORT_NEVER_ANSWER), 0.5)


@pytest.mark.asyncio
async def test_asyncssh_server_drops_connection(asyncssh_server: AsyncsshServer) -> None:
    async with _connect(asyncssh_server) as conn:
        with pytest.raises((asyncssh.Error, ConnectionError, OSError)):
            await asyncio.wait_for(
                conn.open_connection("127.0.0.1", PORT_DROP_CONNECTION), CLIENT_TIMEOUT
            )
        await asyncio.wait_for(conn.wait_closed(), CLIENT_TIMEOUT)


@pytest.mark.asyncio
async def test_asyncssh_server_forwards_loopback_only(
    asyncssh_server: AsyncsshServer, echo_target: EchoTarget
) -> None:
    async with _connect(asyncssh_server) as conn:
        for host in ("127.0.0.1", "localhost"):
            reader, writer = await conn.open_connection(host, echo_target.port)
            writer.write(b"abc")
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
            assert reply == EchoTarget.expected_reply(b"abc")
        # Rejected by the fixture itself: nothing is resolved or contacted.
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await conn.open_connection("example.com", 80)
    assert info.value.reason == "Name or service not known"


@pytest.mark.asyncio
async def test_asyncssh_server_password_auth(asyncssh_server: AsyncsshServer) -> None:
    user, password = ALICE
    async with _connect(
        asyncssh_server,
        username=user,
        password=password,
        client_keys=None,
        preferred_auth="password",
    ) as conn:
        assert conn.get_extra_info("username") == user
    with pytest.raises(asyncssh.PermissionDenied):
        async with _connect(
            asyncssh_server,
            username=user,
            password="wrong",
            client_keys=None,
            preferred_auth="password",
        ):
            pass


@pytest.mark.asyncio
async def test_asyncssh_server_kbdint_otp(asyncssh_server: AsyncsshServer) -> None:
    seen: list[tuple[str, list[tuple[str, bool]]]] = []

    class OtpClient(asyncssh.SSHClient):
        def kbdint_auth_requested(self) -> str:
            return ""

        def kbdint_challenge_received(
            self, name: str, instructions: str, lang: str, prompts: Any
        ) -> list[str]:
            seen.append((instructions, list(prompts)))
            return [ALICE[1], OTP_CODE][: len(prompts)]

    async with _connect(
        asyncssh_server,
        username=OTP_USER,
        client_keys=None,
        client_factory=OtpClient,
        preferred_auth="keyboard-interactive",
    ):
        pass
    assert seen == [(OTP_INSTRUCTIONS, [("Password: ", False), ("Verification code: ", True)])]


@pytest.mark.asyncio
async def test_asyncssh_server_drop_all(asyncssh_server: AsyncsshServer) -> None:
    async with _connect(asyncssh_server) as conn:
        await asyncio.to_thread(asyncssh_server.drop_all)
        await asyncio.wait_for(conn.wait_closed(), CLIENT_TIMEOUT)


def test_asyncssh_server_with_openssh_client(asyncssh_server: AsyncsshServer) -> None:
    # ssh -W opens a direct-tcpip channel, the same request a SOCKS tunnel makes.
    cmd = [
        _need("ssh"), "-F", "/dev/null", "-i", asyncssh_server.client_key,
        "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={asyncssh_server.known_hosts}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
        "-p", str(asyncssh_server.port), "-W", f"127.0.0.1:{PORT_ECHO}",
        f"anyone@{asyncssh_server.host}",
    ]  # fmt: skip
    result = subprocess.run(
        cmd, check=False, input=b"ping\n", capture_output=True, timeout=CLIENT_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"ping\n"


# -- loopback targets ----------------------------------------------------------------------


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [_need("curl"), "--silent", "--show-error", "--fail", "--noproxy", "*", *args],
        check=False, capture_output=True, timeout=CLIENT_TIMEOUT,
    )  # fmt: skip


def test_http_target_with_curl(http_target: HttpTarget) -> None:
    big = _curl(http_target.url("/big"))
    assert big.returncode == 0, big.stderr
    assert len(big.stdout) == http_target.big_size == 8 * 1024 * 1024
    assert hashlib.sha256(big.stdout).hexdigest() == http_target.big_sha256
    assert _curl(http_target.url("/hello")).stdout == b"hello through the tunnel\n"
    posted = _curl("--data-binary", "some payload", http_target.url("/echo"))
    assert posted.stdout == b"some payload"
    assert _curl(http_target.url("/nope")).returncode != 0


def test_http_target_drip_stays_open(http_target: HttpTarget) -> None:
    """/drip answers with its burst at once and then holds the connection open, so a
    test can watch a connection that stays open whatever the socket buffers hold."""
    with socket.create_connection(("127.0.0.1", http_target.port), timeout=5) as sock:
        sock.sendall(b"GET /drip HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < DRIP_BURST:
            chunk = sock.recv(65536)
            assert chunk, got[:200]
            got += chunk
        head, body = got.split(b"\r\n\r\n", 1)
        assert f"Content-Length: {DRIP_SIZE}".encode() in head
        assert len(body) < DRIP_SIZE  # the rest trickles: the response is not over yet
        sock.settimeout(2)
        assert sock.recv(65536)  # and it keeps coming


def test_http_target6_with_curl(http_target6: HttpTarget) -> None:
    assert http_target6.url("/hello").startswith("http://[::1]:")
    result = _curl("--globoff", http_target6.url("/hello"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello through the tunnel\n"


def test_echo_target_half_close(echo_target: EchoTarget) -> None:
    payload = b"half-close " * 50_000
    with socket.create_connection((echo_target.host, echo_target.port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply == EchoTarget.expected_reply(payload)


def test_talker_target_half_close(talker_target: TalkerTarget) -> None:
    done, sent = len(talker_target.received), 12345
    with socket.create_connection((talker_target.host, talker_target.port), timeout=10) as sock:
        greeting = b""
        while chunk := sock.recv(4096):  # server's EOF arrives first
            greeting += chunk
        assert greeting == TalkerTarget.greeting
        sock.sendall(b"z" * sent)  # and we can still send afterwards
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    assert talker_target.wait_received(done + 1)[-1] == sent


def test_closed_port_refuses(closed_port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", closed_port), timeout=5).close()

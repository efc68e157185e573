"""SOCKS5 username/password (``--proxy-auth``) against the real OpenSSH sshd, with
python-socks, curl and raw sockets: the right credentials open a channel, wrong ones get
``01 01`` and a ``client_rejected`` event with ``"auth": true``, a client that offers
only no-auth gets ``05 FF``, SOCKS4 gets 91; and the password, which comes from the
environment or a file, shows up nowhere a bystander could read it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.event_fence import fence, since, wait_since
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    Running,
    clean_env,
    client_name,
    closed_by_peer,
    connect_proxy,
    recv_all,
    recv_exact,
    run_pytunnel,
    running_pytunnel,
    server_args,
    socks4_request,
    socks5_greeting,
    socks5_request,
)
from fixtures.replies import SOCKS5_OK
from fixtures.sshd import SshdServer
from fixtures.targets import HttpTarget
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy as AsyncProxy
from python_socks.sync import Proxy

pytestmark = pytest.mark.timeout(60)

USER = "bob"
PASSWORD = "s0cks-Pa55word-7f3a"
WRONG = "wr0ng-Guess-91c2"
ENV = {"PYTUNNEL_PROXY_PASSWORD": PASSWORD}
CLIENT_TIMEOUT = 10.0
CURL_TIMEOUT = 30.0
LOG_TIMEOUT = 5.0

METHOD_USERPASS = b"\x05\x02"
METHOD_NONE = b"\x05\xff"
AUTH_OK = b"\x01\x00"
AUTH_FAIL = b"\x01\x01"


def rfc1929(username: str, password: str) -> bytes:
    user, secret = username.encode(), password.encode()
    return bytes((1, len(user))) + user + bytes((len(secret),)) + secret


def hello_request(http_target: HttpTarget) -> bytes:
    return (
        f"GET /hello HTTP/1.1\r\nHost: {http_target.netloc}\r\nConnection: close\r\n\r\n".encode()
    )


@pytest.fixture(scope="module")
def auth_tunnel(sshd: SshdServer) -> Iterator[Running]:
    args = ["-D", "127.0.0.1:0", "--proxy-auth", USER, *server_args(sshd)]
    with running_pytunnel(args, env=ENV) as running:
        yield running


def run_curl(curl: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [curl, "--silent", "--show-error", "--max-time", str(CURL_TIMEOUT), *args],
        capture_output=True,
        timeout=CURL_TIMEOUT + 10,
        env=clean_env(),
        check=False,
    )


# ---- python-socks -----------------------------------------------------------------------


def test_python_socks_right_credentials(auth_tunnel: Running, http_target: HttpTarget) -> None:
    proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@{auth_tunnel.netloc}")
    sock = proxy.connect("127.0.0.1", http_target.port, timeout=CLIENT_TIMEOUT)
    with sock:
        client = client_name(sock)
        sock.sendall(hello_request(http_target))
        answer = recv_all(sock, CLIENT_TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(http_target.hello_body)
    opened = auth_tunnel.wait_event("channel_opened", client=client)
    assert (opened["host"], opened["port"]) == ("127.0.0.1", http_target.port)


async def test_python_socks_asyncio_right_credentials(
    auth_tunnel: Running, http_target: HttpTarget
) -> None:
    proxy = AsyncProxy.from_url(f"socks5://{USER}:{PASSWORD}@{auth_tunnel.netloc}", rdns=True)
    sock = await asyncio.wait_for(proxy.connect("localhost", http_target.port), CLIENT_TIMEOUT)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(hello_request(http_target))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.endswith(http_target.hello_body)


@pytest.mark.parametrize(
    ("user", "password"), [(USER, WRONG), ("alice", PASSWORD)], ids=["wrong-password", "wrong-user"]
)
def test_python_socks_wrong_credentials(
    auth_tunnel: Running, sshd: SshdServer, http_target: HttpTarget, user: str, password: str
) -> None:
    before = fence(auth_tunnel)
    mark = sshd.log_mark()
    proxy = Proxy.from_url(f"socks5://{user}:{password}@{auth_tunnel.netloc}")
    with pytest.raises(ProxyError):
        proxy.connect("127.0.0.1", http_target.port, timeout=CLIENT_TIMEOUT)
    [rejected] = wait_since(auth_tunnel, before, "client_rejected", auth=True)
    assert rejected["auth"] is True
    assert "SOCKS5" in rejected["reason"]
    assert since(auth_tunnel, before, "request_parsed") == []
    assert f"target 127.0.0.1 port {http_target.port}" not in sshd.log_text(mark)


# ---- curl ------------------------------------------------------------------------------


def test_curl_socks5h_right_credentials(
    curl: str, auth_tunnel: Running, http_target: HttpTarget
) -> None:
    before = fence(auth_tunnel)
    result = run_curl(
        curl,
        "--proxy",
        f"socks5h://{USER}:{PASSWORD}@{auth_tunnel.netloc}",
        f"http://localhost:{http_target.port}/hello",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == http_target.hello_body
    [parsed] = wait_since(auth_tunnel, before, "request_parsed")
    assert (parsed["protocol"], parsed["host"], parsed["sent_name"]) == (
        "socks5",
        "localhost",
        True,
    )


@pytest.mark.parametrize(
    "proxy_creds", [f"{USER}:{WRONG}@", ""], ids=["wrong-password", "no-credentials"]
)
def test_curl_socks5h_refused(
    curl: str, auth_tunnel: Running, http_target: HttpTarget, proxy_creds: str
) -> None:
    before = fence(auth_tunnel)
    result = run_curl(
        curl,
        "--proxy",
        f"socks5h://{proxy_creds}{auth_tunnel.netloc}",
        f"http://localhost:{http_target.port}/hello",
    )
    assert result.returncode == 97, result.stderr  # CURLE_PROXY: the SOCKS handshake failed
    assert result.stdout == b""
    [rejected] = wait_since(auth_tunnel, before, "client_rejected")
    # Wrong credentials are an auth failure; offering no way to log in is a protocol one.
    assert rejected["auth"] is bool(proxy_creds)
    assert since(auth_tunnel, before, "request_parsed") == []


# ---- raw sockets -----------------------------------------------------------------------


def test_offering_only_no_auth_gets_05_ff_then_close(auth_tunnel: Running) -> None:
    before = fence(auth_tunnel)
    with connect_proxy(auth_tunnel.address) as sock:
        sock.sendall(socks5_greeting(b"\x00"))
        assert recv_exact(sock, 2) == METHOD_NONE
        assert closed_by_peer(sock) == b""
    [rejected] = wait_since(auth_tunnel, before, "client_rejected")
    assert rejected["auth"] is False
    assert "authentication method" in rejected["reason"]


def test_wrong_password_gets_01_01_then_close(auth_tunnel: Running) -> None:
    with connect_proxy(auth_tunnel.address) as sock:
        sock.sendall(socks5_greeting(b"\x00\x02"))
        assert recv_exact(sock, 2) == METHOD_USERPASS
        sock.sendall(rfc1929(USER, WRONG))
        assert recv_exact(sock, 2) == AUTH_FAIL
        assert closed_by_peer(sock) == b""


def test_right_password_step_by_step(auth_tunnel: Running, http_target: HttpTarget) -> None:
    with connect_proxy(auth_tunnel.address) as sock:
        sock.sendall(socks5_greeting(b"\x02"))
        assert recv_exact(sock, 2) == METHOD_USERPASS
        sock.sendall(rfc1929(USER, PASSWORD))
        assert recv_exact(sock, 2) == AUTH_OK
        sock.sendall(socks5_request("127.0.0.1", http_target.port))
        assert recv_exact(sock, 10) == SOCKS5_OK
        sock.sendall(hello_request(http_target))
        assert recv_all(sock, CLIENT_TIMEOUT).endswith(http_target.hello_body)


def test_everything_pipelined_in_one_write(auth_tunnel: Running, http_target: HttpTarget) -> None:
    """Greeting, credentials, CONNECT and the HTTP request in one segment: the codec
    must keep what follows each step for the next one."""
    with connect_proxy(auth_tunnel.address) as sock:
        sock.sendall(
            socks5_greeting(b"\x00\x02")
            + rfc1929(USER, PASSWORD)
            + socks5_request("localhost", http_target.port)
            + hello_request(http_target)
        )
        answer = recv_all(sock, CLIENT_TIMEOUT)
    assert answer.startswith(METHOD_USERPASS + AUTH_OK + SOCKS5_OK)
    assert answer.endswith(http_target.hello_body)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["socks4", "socks4a"])
def test_socks4_is_refused_with_91(
    auth_tunnel: Running, sshd: SshdServer, http_target: HttpTarget, host: str
) -> None:
    before = fence(auth_tunnel)
    mark = sshd.log_mark()
    with connect_proxy(auth_tunnel.address) as sock:
        sock.sendall(socks4_request(host, http_target.port, user=USER.encode()))
        reply = recv_exact(sock, 8)
        assert closed_by_peer(sock) == b""
    assert reply[:2] == b"\x00\x5b"
    [failed] = wait_since(auth_tunnel, before, "channel_failed")
    assert failed["reply"] == 2
    assert "SOCKS4" in failed["reason"]
    assert since(auth_tunnel, before, "channel_opened") == []
    # sshd logs asynchronously: a later, allowed request to the other spelling showing up
    # in its log proves the refused one would have shown up by now.
    other = "localhost" if host == "127.0.0.1" else "127.0.0.1"
    proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@{auth_tunnel.netloc}", rdns=True)
    with proxy.connect(other, http_target.port, timeout=CLIENT_TIMEOUT):
        pass
    assert sshd.wait_log(f"target {other} port {http_target.port}", LOG_TIMEOUT, mark)
    assert f"target {host} port {http_target.port}" not in sshd.log_text(mark)


# ---- the secret stays secret -----------------------------------------------------------


def exercise(tunnel: Running, http_target: HttpTarget, password: str) -> None:
    """Right and wrong credentials over SOCKS5 and HTTP, so every log path runs."""
    right = Proxy.from_url(f"socks5://{USER}:{password}@{tunnel.netloc}")
    with right.connect("127.0.0.1", http_target.port, timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(hello_request(http_target))
        assert recv_all(sock, CLIENT_TIMEOUT).endswith(http_target.hello_body)
    wrong = Proxy.from_url(f"socks5://{USER}:{WRONG}@{tunnel.netloc}")
    with pytest.raises(ProxyError):
        wrong.connect("127.0.0.1", http_target.port, timeout=CLIENT_TIMEOUT)
    with socket.create_connection(tunnel.address, timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(
            f"GET {http_target.url('/hello')} HTTP/1.1\r\nHost: {http_target.netloc}\r\n"
            f"Proxy-Authorization: Basic {_basic(USER, WRONG)}\r\n\r\n".encode()
        )
        assert recv_all(sock, CLIENT_TIMEOUT).startswith(b"HTTP/1.1 407")
    tunnel.wait_events("client_rejected", 2, auth=True)


def _basic(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"{user}:{password}".encode()).decode()


def assert_secret_nowhere(tunnel: Running, *secrets: str) -> None:
    cmdline = Path(f"/proc/{tunnel.pid}/cmdline").read_bytes()
    for secret in secrets:
        assert secret.encode() not in cmdline
    tunnel.stop()
    output = tunnel.stdout_text() + tunnel.stderr_text()
    assert output, "the tunnel said nothing at all"
    for secret in secrets:
        assert secret not in output
        assert _basic(USER, secret) not in output


def test_password_from_env_is_not_shown(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, http_target: HttpTarget
) -> None:
    tunnel = pytunnel_factory(
        ["-v", "-D", "127.0.0.1:0", "--proxy-auth", USER, *server_args(sshd)], env=ENV
    )
    exercise(tunnel, http_target, PASSWORD)
    assert_secret_nowhere(tunnel, PASSWORD, WRONG)


def test_password_from_file_is_not_shown(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, http_target: HttpTarget, tmp_path: Path
) -> None:
    secret = "fr0m-a-File-5d1e"
    path = tmp_path / "proxy-password"
    path.write_text(f"{secret}\nsecond line is ignored\n")
    path.chmod(0o600)
    tunnel = pytunnel_factory(
        [
            "-v",
            "-D",
            "127.0.0.1:0",
            "--proxy-auth",
            USER,
            "--proxy-password-file",
            str(path),
            *server_args(sshd),
        ],
    )
    exercise(tunnel, http_target, secret)
    assert_secret_nowhere(tunnel, secret, WRONG)


# ---- a wrapped command (-- COMMAND) gets proxy URLs that carry the credentials ----------

# Every character that means something in a URL's userinfo, and a literal percent.
URL_HOSTILE_PASSWORD = "p@ss:w/rd%41 #?x"
PROXY_VARIABLES = (
    "ALL_PROXY",
    "all_proxy",
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
)


@pytest.mark.parametrize(
    ("variable", "protocol"), [("ALL_PROXY", "socks5"), ("http_proxy", "http")]
)
def test_wrapped_command_uses_the_proxy_with_its_credentials(
    curl: str,
    sshd: SshdServer,
    http_target: HttpTarget,
    tmp_path: Path,
    variable: str,
    protocol: str,
) -> None:
    """curl run as the command, told only ``-x "$VARIABLE"``, fetches through the tunnel:
    the URL carries user and password percent-encoded; no other variable has the password."""
    body, environment = tmp_path / "body", tmp_path / "environment"
    script = (
        'env > "$1"; '
        f'exec "$2" --silent --show-error --max-time {CURL_TIMEOUT:g} --noproxy "" '
        f'-x "${variable}" -o "$3" "$4"'
    )
    args = ["--json", "-D", "127.0.0.1:0", "--proxy-auth", USER, *server_args(sshd)]
    command = [
        "sh",
        "-c",
        script,
        "sh",
        str(environment),
        curl,
        str(body),
        http_target.url("/hello"),
    ]
    result = run_pytunnel(
        [*args, "--", *command], env={"PYTUNNEL_PROXY_PASSWORD": URL_HOSTILE_PASSWORD}
    )
    assert result.returncode == 0, result.describe()
    assert body.read_bytes() == http_target.hello_body
    [parsed] = [ev for ev in result.events if ev["event"] == "request_parsed"]
    assert parsed["protocol"] == protocol
    lines = environment.read_text().splitlines()
    names = {line.split("=", 1)[0] for line in lines}
    assert "PYTUNNEL_PROXY_PASSWORD" not in names
    assert not [line for line in lines if URL_HOSTILE_PASSWORD in line]
    encoded = "p%40ss%3Aw%2Frd%2541%20%23%3Fx"
    carrying = {line.split("=", 1)[0] for line in lines if encoded in line}
    assert carrying == set(PROXY_VARIABLES)

"""Other SOCKS client implementations through pytunnel and the real sshd: python-socks
(sync and asyncio, SOCKS4/4a/5 with local or remote DNS), httpx (socksio), ncat, socat."""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fixtures.pytunnel_proc import (
    Running,
    clean_env,
    client_name,
    recv_all,
    request_protocol,
    running_pytunnel,
    server_args,
)
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget, HttpTarget
from python_socks.async_.asyncio import Proxy as AsyncProxy
from python_socks.sync import Proxy

pytestmark = pytest.mark.timeout(60)

CLIENT_TIMEOUT = 30.0
PAYLOAD = random.Random(99).randbytes(300_000)


@pytest.fixture(scope="module")
def shared_tunnel(sshd: SshdServer) -> Iterator[Running]:
    with running_pytunnel(["-D", "127.0.0.1:0", *server_args(sshd)]) as running:
        yield running


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed")
    return path


# (proxy scheme, rdns, host to ask for, protocol pytunnel sees, name sent)
SOCKS_CASES = [
    ("socks5", True, "localhost", "socks5", True),
    ("socks5", False, "localhost", "socks5", False),  # python-socks resolves, sends 127.0.0.1
    ("socks5", False, "127.0.0.1", "socks5", False),
    ("socks4", True, "localhost", "socks4a", True),
    ("socks4", False, "localhost", "socks4", False),
]
SOCKS_IDS = ["socks5-rdns", "socks5-local-dns", "socks5-address", "socks4a", "socks4"]


def check_request(tunnel: Running, client: str, protocol: str, sent_name: bool, host: str) -> None:
    event = tunnel.wait_event("request_parsed", client=client)
    assert (request_protocol(event), event["sent_name"]) == (protocol, sent_name)
    assert event["host"] == (host if sent_name else "127.0.0.1")


@pytest.mark.parametrize(
    ("scheme", "rdns", "host", "protocol", "sent_name"), SOCKS_CASES, ids=SOCKS_IDS
)
def test_python_socks_sync(
    shared_tunnel: Running,
    echo_target: EchoTarget,
    scheme: str,
    rdns: bool,
    host: str,
    protocol: str,
    sent_name: bool,
) -> None:
    proxy = Proxy.from_url(f"{scheme}://{shared_tunnel.netloc}", rdns=rdns)
    sock = proxy.connect(host, echo_target.port, timeout=CLIENT_TIMEOUT)
    with sock:
        client = client_name(sock)
        sock.sendall(PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock, CLIENT_TIMEOUT) == EchoTarget.expected_reply(PAYLOAD)
    check_request(shared_tunnel, client, protocol, sent_name, host)


@pytest.mark.parametrize(
    ("scheme", "rdns", "host", "protocol", "sent_name"), SOCKS_CASES, ids=SOCKS_IDS
)
async def test_python_socks_asyncio(
    shared_tunnel: Running,
    echo_target: EchoTarget,
    scheme: str,
    rdns: bool,
    host: str,
    protocol: str,
    sent_name: bool,
) -> None:
    proxy = AsyncProxy.from_url(f"{scheme}://{shared_tunnel.netloc}", rdns=rdns)
    sock = await asyncio.wait_for(proxy.connect(host, echo_target.port), CLIENT_TIMEOUT)
    client = client_name(sock)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(PAYLOAD)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer == EchoTarget.expected_reply(PAYLOAD)
    check_request(shared_tunnel, client, protocol, sent_name, host)


def test_python_socks_reports_a_refused_port(shared_tunnel: Running, closed_port: int) -> None:
    from python_socks import ProxyError

    proxy = Proxy.from_url(f"socks5://{shared_tunnel.netloc}")
    with pytest.raises(ProxyError) as info:
        proxy.connect("127.0.0.1", closed_port, timeout=CLIENT_TIMEOUT)
    assert info.value.error_code == 5  # python-socks surfaces the honest REP


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_httpx(shared_tunnel: Running, http_target: HttpTarget, scheme: str) -> None:
    proxy = f"{scheme}://{shared_tunnel.netloc}"
    try:
        client = httpx.Client(proxy=proxy, trust_env=False, timeout=CLIENT_TIMEOUT)
    except ValueError as exc:  # older httpx spell remote DNS only as socks5
        pytest.skip(f"httpx does not take {scheme}: {exc}")
    with client:
        hello = client.get(f"http://localhost:{http_target.port}/hello")
        assert (hello.status_code, hello.content) == (200, http_target.hello_body)
        big = client.get(f"http://127.0.0.1:{http_target.port}/big")
        assert big.status_code == 200
        assert hashlib.sha256(big.content).hexdigest() == http_target.big_sha256
        echoed = client.post(f"http://localhost:{http_target.port}/echo", content=PAYLOAD)
        assert echoed.content == PAYLOAD


async def test_httpx_async(shared_tunnel: Running, http_target: HttpTarget) -> None:
    proxy = f"socks5://{shared_tunnel.netloc}"
    async with httpx.AsyncClient(proxy=proxy, trust_env=False, timeout=CLIENT_TIMEOUT) as client:
        responses = await asyncio.gather(
            *(client.get(f"http://localhost:{http_target.port}/hello") for _ in range(5))
        )
    assert [r.content for r in responses] == [http_target.hello_body] * 5


def run_tool(cmd: list[str], data: bytes) -> bytes:
    result = subprocess.run(
        cmd,
        input=data,
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def last_request(tunnel: Running, before: int) -> dict[str, Any]:
    [event] = tunnel.wait_events("request_parsed", before + 1)[before:]
    return event


@pytest.mark.parametrize(
    ("proxy_type", "extra", "host"),
    [
        ("socks5", [], "127.0.0.1"),
        ("socks5", ["--proxy-dns", "remote"], "localhost"),
        ("socks4", [], "127.0.0.1"),
    ],
    ids=["socks5", "socks5-remote-dns", "socks4"],
)
def test_ncat(
    shared_tunnel: Running,
    echo_target: EchoTarget,
    proxy_type: str,
    extra: list[str],
    host: str,
) -> None:
    ncat = need("ncat")
    before = len(shared_tunnel.events("request_parsed"))
    cmd = [
        ncat, "--proxy", shared_tunnel.netloc, "--proxy-type", proxy_type, *extra,
        "--wait", "10", host, str(echo_target.port),
    ]  # fmt: skip
    # ncat half-closes on stdin EOF, so the echo target's answer proves both directions.
    assert run_tool(cmd, PAYLOAD) == EchoTarget.expected_reply(PAYLOAD)
    event = last_request(shared_tunnel, before)
    assert (request_protocol(event), event["host"]) == (proxy_type, host)


@pytest.mark.parametrize(
    ("address_type", "host", "sent_name"),
    [("SOCKS4A", "localhost", True), ("SOCKS4", "127.0.0.1", False)],
)
def test_socat(
    shared_tunnel: Running, echo_target: EchoTarget, address_type: str, host: str, sent_name: bool
) -> None:
    socat = need("socat")
    before = len(shared_tunnel.events("request_parsed"))
    proxy_host, proxy_port = shared_tunnel.address
    target = f"{address_type}:{proxy_host}:{host}:{echo_target.port},socksport={proxy_port}"
    # -t: after our EOF, wait (up to) this long for the answer instead of socat's 0.5 s.
    cmd = [socat, "-t", "20", "-T", "30", "-", target]
    assert run_tool(cmd, PAYLOAD) == EchoTarget.expected_reply(PAYLOAD)
    event = last_request(shared_tunnel, before)
    assert (request_protocol(event), event["host"]) == (address_type.lower(), host)
    assert event["sent_name"] is sent_name

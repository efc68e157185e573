"""``-R`` and SOCKS BIND connections whose channel open arrives before the server's answer
to ``tcpip-forward``: held, and served once the answer comes (or refused with it).

The server is an in-process asyncssh one (tests/fixtures/early_opens.py) that always opens
the channels first and answers second, so the race that sshd leaves to chance is certain
here. Each open runs a small program on the server's side; its outcome is what we check.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncssh
import pytest
from fixtures.early_opens import (
    DYNAMIC_PORT,
    ORIGIN,
    ORIGINS_PER_REQUEST,
    EarlyOpenServer,
    Program,
)
from fixtures.keys import SshKeys
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    recv_all,
    run_pytunnel,
    server_args,
    socks5_greeting,
    socks5_request,
)
from fixtures.targets import EchoTarget
from fixtures.udp_targets import socks5_bind

from tunnel import events, fastpath
from tunnel.config import Config, Destination, HostKeyPolicy
from tunnel.session import Session

pytestmark = pytest.mark.timeout(90)

FIXED_PORT = 47021  # what -R asks for; the server only names it, nothing binds it
PAYLOAD = b"sent before the answer"
EXIT_LISTEN_ERROR = 3


@pytest.fixture
def early_server(ssh_keys: SshKeys, tmp_path: Path) -> Iterator[EarlyOpenServer]:
    server = EarlyOpenServer(ssh_keys.client_key, tmp_path / "early").start()
    try:
        yield server
    finally:
        server.stop()


def socks_to(target: EchoTarget) -> Program:
    """A program on the server speaking SOCKS5 to the -R port: CONNECT, send, read back."""

    async def program(
        reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]
    ) -> tuple[int, bytes]:
        writer.write(socks5_greeting())
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(socks5_request(target.host, target.port))
        reply = await reader.readexactly(10)
        writer.write(PAYLOAD)
        writer.write_eof()
        return reply[1], await reader.read()

    return program


async def bind_peer(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> bytes:
    """The peer of a BIND: says hello, then reads what the BIND's client sends."""
    writer.write(b"from the peer")
    writer.write_eof()
    return await reader.read()


@pytest.mark.parametrize(
    ("spec", "port"), [("0", DYNAMIC_PORT), (str(FIXED_PORT), FIXED_PORT)], ids=["dynamic", "fixed"]
)
def test_reverse_connections_before_the_answer_are_served(
    early_server: EarlyOpenServer,
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
    spec: str,
    port: int,
) -> None:
    early_server.early = 2
    early_server.program = socks_to(echo_target)
    tunnel = pytunnel_factory(["-R", spec, *server_args(early_server)])
    assert tunnel.ready["listeners"][0]["port"] == port
    expected = (0, EchoTarget.expected_reply(PAYLOAD))
    assert [early_server.next_outcome() for _ in range(2)] == [(port, expected)] * 2
    assert tunnel.events("incoming_refused") == []
    # The listener keeps serving once answered, of course.
    assert len(tunnel.wait_events("channel_opened", 2)) == 2


def test_refused_forward_refuses_the_held_connection_with_the_answer(
    early_server: EarlyOpenServer, echo_target: EchoTarget
) -> None:
    early_server.agree = False
    early_server.program = socks_to(echo_target)
    result = run_pytunnel(["-R", str(FIXED_PORT), *server_args(early_server)])
    assert result.returncode == EXIT_LISTEN_ERROR, result.describe()
    port, outcome = early_server.next_outcome()
    assert port == FIXED_PORT
    assert isinstance(outcome, asyncssh.ChannelOpenError), outcome
    assert outcome.reason == f"the server refused to listen on 127.0.0.1:{FIXED_PORT}"
    # ... and says so, with the port and the reason.
    client = f"{ORIGIN[0]}:{ORIGIN[1]}"
    assert (
        f"{client} -> 127.0.0.1:{FIXED_PORT} (on the server) refused: {outcome.reason}"
        in result.stderr
    ), result.describe()
    assert "Traceback" not in result.stderr


def test_connection_to_a_port_never_asked_for_is_refused_and_reported(
    early_server: EarlyOpenServer, pytunnel_factory: PytunnelFactory, echo_target: EchoTarget
) -> None:
    early_server.stray = True
    early_server.program = socks_to(echo_target)
    tunnel = pytunnel_factory(
        ["-R", str(FIXED_PORT), *server_args(early_server)], json_out=False, wait_ready=False
    )
    outcomes = dict(early_server.next_outcome() for _ in range(2))
    assert outcomes[FIXED_PORT] == (0, EchoTarget.expected_reply(PAYLOAD))
    stray = outcomes[FIXED_PORT + 1]
    assert isinstance(stray, asyncssh.ChannelOpenError), stray
    client = f"{ORIGIN[0]}:{ORIGIN[1] + 1}"
    line = f"{client} -> 127.0.0.1:{FIXED_PORT + 1} (on the server) refused: no such listener"
    assert tunnel.wait_stderr(line), tunnel.describe()


def test_bind_peer_before_the_answer_is_served(
    early_server: EarlyOpenServer, pytunnel_factory: PytunnelFactory
) -> None:
    early_server.program = bind_peer
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(early_server)])
    with socks5_bind(*tunnel.address, ORIGIN[0], 0) as bind:
        assert (bind.first_code, bind.first_address) == (0, ("127.0.0.1", DYNAMIC_PORT))
        assert bind.second_reply() == (0, *ORIGIN)
        assert recv_all(bind.sock) == b"from the peer"
        bind.sock.sendall(b"from the client")
        bind.sock.shutdown(socket.SHUT_WR)
        assert early_server.next_outcome() == (DYNAMIC_PORT, b"from the client")
    assert early_server.asked == [("127.0.0.1", 0)]


async def test_a_failing_handler_costs_that_connection_only(
    early_server: EarlyOpenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    seen: list[events.Event] = []
    config = Config(
        Destination(early_server.host, "tester", early_server.port),
        identities=(early_server.client_key,),
        identities_only=True,
        ssh_config=(),
        known_hosts=(early_server.known_hosts,),
        global_known_hosts=(),
        host_key_policy=HostKeyPolicy.YES,
        connect_timeout=10.0,
    )
    session = Session(config, seen.append)
    await asyncio.wait_for(session.connect(), 30)

    def broken(origin: tuple[str, int]) -> None:
        raise RuntimeError("a bug")

    try:
        listener = await session.listen_tcp("127.0.0.1", FIXED_PORT, broken)
        port, outcome = await asyncio.to_thread(early_server.next_outcome)
        assert port == listener.port == FIXED_PORT
        assert isinstance(outcome, asyncssh.ChannelOpenError), outcome
        assert outcome.reason == "internal error in pytunnel"
        [refused] = [event for event in seen if isinstance(event, events.IncomingRefused)]
        client = f"{ORIGIN[0]}:{ORIGIN[1]}"
        why = "internal error: RuntimeError('a bug')"
        assert refused == events.IncomingRefused("127.0.0.1", FIXED_PORT, client, why)
        assert session.is_up
    finally:
        await session.close()


def test_binds_in_flight_together_each_get_the_peer_of_their_port(
    early_server: EarlyOpenServer, pytunnel_factory: PytunnelFactory
) -> None:
    """Two BINDs ask for port 0 on the same address at once: the first port's open comes
    while both are unanswered, and must go to the BIND whose answer names that port."""
    early_server.program = bind_peer
    early_server.pipelined = 2
    tunnel = pytunnel_factory(["-D", "127.0.0.1:0", *server_args(early_server)])
    with ThreadPoolExecutor(2) as pool:
        binds = list(pool.map(lambda _: socks5_bind(*tunnel.address, ORIGIN[0], 0), range(2)))
    try:
        ports = sorted(bind.first_address[1] for bind in binds)
        assert ports == [DYNAMIC_PORT, DYNAMIC_PORT + 1]
        for bind in binds:
            number = bind.first_address[1] - DYNAMIC_PORT
            peer = (ORIGIN[0], ORIGIN[1] + ORIGINS_PER_REQUEST * number)
            assert bind.second_reply() == (0, *peer)
            assert recv_all(bind.sock) == b"from the peer"
            bind.sock.sendall(f"to {number}".encode())
            bind.sock.shutdown(socket.SHUT_WR)
        outcomes = dict(early_server.next_outcome() for _ in binds)
        assert outcomes == {DYNAMIC_PORT: b"to 0", DYNAMIC_PORT + 1: b"to 1"}
    finally:
        for bind in binds:
            bind.close()


# -- the version guard --------------------------------------------------------------------


def test_installed_asyncssh_is_one_the_fast_path_was_tested_with() -> None:
    # Fails when asyncssh is upgraded: read its connection.py again (_connect,
    # _process_forwarded_tcpip_open, create_server), rerun this file, then add the version.
    assert fastpath.supported(), (asyncssh.__version__, sorted(fastpath.TESTED_VERSIONS))


@pytest.mark.parametrize("version", ["2.24.0", "2.24.10", "2.25.0", "3.0.0", "2.14.2", ""])
def test_other_asyncssh_versions_are_not_enabled(version: str) -> None:
    assert not fastpath.supported(version)


async def test_an_untested_asyncssh_gets_a_stock_connection_and_one_line(
    early_server: EarlyOpenServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fastpath, "TESTED_VERSIONS", frozenset())
    monkeypatch.setattr(fastpath, "_said_stock", False)
    caplog.set_level(logging.INFO, logger="tunnel.fastpath")
    refused: list[object] = []
    kwargs = {
        "port": early_server.port,
        "username": "tester",
        "client_keys": [early_server.client_key],
        "known_hosts": early_server.known_hosts,
        "agent_path": None,
        "config": (),
    }
    for _ in range(2):
        conn = await fastpath.connect(early_server.host, refused.append, **kwargs)
        async with conn:
            assert type(conn) is asyncssh.SSHClientConnection
    [record] = [r for r in caplog.records if r.name == "tunnel.fastpath"]
    assert f"asyncssh {asyncssh.__version__} is not a version" in record.getMessage()
    monkeypatch.undo()
    conn = await fastpath.connect(early_server.host, refused.append, **kwargs)
    async with conn:
        assert isinstance(conn, fastpath.HoldingConnection)
    assert refused == []

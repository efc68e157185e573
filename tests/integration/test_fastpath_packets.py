"""The fast path's packet path (tunnel/fastpath.py, ``FastPackets``) against a real sshd,
side by side with stock asyncssh: the same relay, byte-exact both ways through forced
rekeys, keepalive answered and keepalive timing out, and what the fast path leaves out
(the empty ``MSG_IGNORE`` for AEAD and encrypt-then-MAC ciphers only).

Each connection relays through one ``direct-tcpip`` channel to an echo server in the
test's own loop; the client's packets are counted on the connection's own packet log
hook (``log_sent_packet``), which asyncssh calls for every packet it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import MSG_GLOBAL_REQUEST, MSG_IGNORE, MSG_NEWKEYS
from fixtures.keys import SshKeys
from fixtures.net import LOOPBACK4
from fixtures.sshd import SshdServer, sshd_available

from tunnel import fastpath

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sshd_available(), reason="OpenSSH server not installed"),
]

# sshd starts a key exchange after every 64 KiB it sends, the client after 128 KiB.
SERVER_REKEY = "64K"
CLIENT_REKEY = 128 * 1024
PAYLOAD = 512 * 1024

# (encryption, MAC): AEAD, AEAD, encrypt-then-MAC, and MAC-then-encrypt (CTR).
CIPHERS = {
    "aes128-gcm": ("aes128-gcm@openssh.com", None),
    "chacha20-poly1305": ("chacha20-poly1305@openssh.com", None),
    "ctr-etm": ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    "ctr-mac": ("aes128-ctr", "hmac-sha2-256"),
}


@pytest.fixture(scope="module")
def rekeying_sshd(
    ssh_keys: SshKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SshdServer]:
    server = SshdServer(ssh_keys, tmp_path_factory.mktemp("sshd_rekey"), RekeyLimit=SERVER_REKEY)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class _Client(asyncssh.SSHClient):
    def __init__(self) -> None:
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class _Sent(Counter[int]):
    """Packets the connection sent, by message number; ``until`` waits for a count."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def count(self, pkttype: int) -> None:
        self[pkttype] += 1
        self.changed.set()

    async def until(self, pkttype: int, count: int) -> None:
        while self[pkttype] < count:
            self.changed.clear()
            await self.changed.wait()


async def _connect(
    sshd: SshdServer,
    fast: bool,
    cipher: str = "aes128-gcm",
    via: tuple[str, int] | None = None,
    **options: Any,
) -> tuple[asyncssh.SSHClientConnection, _Client, _Sent]:
    """A connection to ``sshd`` (directly or ``via`` a relay), fast or stock, and the
    count of the packets it sends."""
    host, port = via or (sshd.host, sshd.port)
    encryption, mac = CIPHERS[cipher]
    client = _Client()
    kwargs: dict[str, Any] = {
        "port": port,
        "username": sshd.user,
        "client_keys": [sshd.client_key],
        "known_hosts": sshd.known_hosts,
        "agent_path": None,
        "config": (),
        "encryption_algs": [encryption],
        "client_factory": lambda: client,
        **options,
    }
    if mac is not None:
        kwargs["mac_algs"] = [mac]
    if via is not None:
        # known_hosts names sshd's own port; the relay's differs.
        kwargs["known_hosts"] = None
    if fast:
        conn = await fastpath.connect(host, lambda *_: None, **kwargs)
        assert isinstance(conn, fastpath.FastPackets)
    else:
        conn = await asyncssh.connect(host, **kwargs)
        assert type(conn) is asyncssh.SSHClientConnection
    sent = _Sent()
    logged = conn.log_sent_packet

    def count(pkttype: int, pktid: int, payload: bytes, note: str = "") -> None:
        sent.count(pkttype)
        logged(pkttype, pktid, payload, note)

    # An instance attribute: asyncssh calls self.log_sent_packet for every packet it sends
    # on the connection itself (ignore packets and key exchange included).
    conn.log_sent_packet = count  # type: ignore[method-assign]
    return conn, client, sent


@contextlib.asynccontextmanager
async def _echo_server() -> AsyncIterator[tuple[str, int]]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(256 * 1024):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, LOOPBACK4, 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()


async def _relay_round_trip(conn: asyncssh.SSHClientConnection, target: tuple[str, int]) -> None:
    """Send PAYLOAD random bytes through one channel to the echo and read them back,
    both directions at once; byte-exact or fail."""
    data = os.urandom(PAYLOAD)
    reader, writer = await conn.open_connection(*target, encoding=None)

    async def send() -> None:
        for at in range(0, len(data), 200_000):
            writer.write(data[at : at + 200_000])
            await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.read(), 60)
    await sending
    writer.close()
    assert len(received) == len(data)
    assert received == data


@pytest.mark.parametrize("cipher", sorted(CIPHERS))
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "stock"])
async def test_relay_is_byte_exact_through_rekeys_with_ignore_packets_where_needed(
    rekeying_sshd: SshdServer, fast: bool, cipher: str
) -> None:
    conn, _, sent = await _connect(rekeying_sshd, fast, cipher, rekey_bytes=CLIENT_REKEY)
    async with conn, _echo_server() as target:
        await _relay_round_trip(conn, target)
        # A second channel after all those key exchanges still opens and carries data.
        await _relay_round_trip(conn, target)
    # The first exchange and at least one rekey each way (ours by bytes, sshd's by its
    # RekeyLimit); every one of them completed, or the data above would not have.
    assert sent[MSG_NEWKEYS] >= 3, sent
    if fast and cipher != "ctr-mac":
        # AEAD and encrypt-then-MAC: no empty MSG_IGNORE at all.
        assert sent[MSG_IGNORE] == 0, sent
    else:
        # Stock asyncssh, and the fast path with a MAC over the plaintext: one before
        # every packet after the key exchange.
        assert sent[MSG_IGNORE] > 10, sent


async def test_keepalive_timer_is_not_rearmed_per_received_packet(
    rekeying_sshd: SshdServer,
) -> None:
    # An interval far longer than the test: the timer armed at authentication must be the
    # one still running after megabytes have come in (stock asyncssh replaces it per read).
    conn, _, _ = await _connect(rekeying_sshd, True, keepalive_interval=3600)
    async with conn, _echo_server() as target:
        armed = conn._keepalive_timer
        assert armed is not None
        await _relay_round_trip(conn, target)
        assert conn._keepalive_timer is armed


class _Relay:
    """A TCP relay from a loopback port to sshd that can stop forwarding (a server or
    path that went silent without closing anything)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, LOOPBACK4, 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while chunk := await src.read(65536):
                if self.frozen.is_set():
                    # Swallow: the peer hears nothing more, and nothing is closed.
                    continue
                dst.write(chunk)
                await dst.drain()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        writer.close()
        up_writer.close()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "stock"])
async def test_keepalive_answered_keeps_the_connection_and_silence_ends_it(
    rekeying_sshd: SshdServer, fast: bool
) -> None:
    relay = _Relay((rekeying_sshd.host, rekeying_sshd.port))
    async with relay as address:
        conn, client, sent = await _connect(
            rekeying_sshd, fast, via=address, keepalive_interval=0.2, keepalive_count_max=2
        )
        async with conn, _echo_server() as target:
            # Idle: keepalives go out and are answered, many more than count_max of them,
            # and the connection stays up and usable.
            await asyncio.wait_for(sent.until(MSG_GLOBAL_REQUEST, 6), 60)
            assert not client.lost.done(), client.lost
            await _relay_round_trip(conn, target)
            # Silence: after count_max unanswered keepalives the connection is dropped.
            relay.frozen.set()
            lost = await asyncio.wait_for(client.lost, 60)
        assert isinstance(lost, asyncssh.ConnectionLost)
        assert "not responding to keepalive" in str(lost)

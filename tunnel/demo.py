"""``pytunnel --demo``: a real SSH server on loopback, so a newcomer sees a tunnel work.

The server is asyncssh's, with host and client keys made for this run and thrown away
after it. pytunnel connects to it exactly as to any server (known_hosts file, identity
file, direct-tcpip channels): only the far end is local. The server forwards to this
machine only, and listens for ``-R`` and BIND on loopback only. It also knows one name
of its own, ``pytunnel.demo``, whose small page it serves right on the channel: a name
your own resolver has never heard of, so reaching it proves that DNS goes through the
tunnel (``socks5h://``).

Forwarding is done here rather than by asyncssh's default (``connection_requested``
returning True): that one never closes a channel whose target closed first and whose
client closed second, so such connections never ended. The demo must end connections as
OpenSSH does: each EOF is passed on, and the channel and the socket are closed once both
sides have sent theirs (or at once when either side goes away).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import asyncssh

DEMO_HOST = "pytunnel.demo"

_PAGE = (
    "Hello from the far side of the tunnel.\n\n"
    "This page came through an SSH direct-tcpip channel opened by pytunnel. The name\n"
    f"{DEMO_HOST} exists only on the demo SSH server: your browser or curl left it to\n"
    "the far side to resolve, as socks5h:// (remote DNS) and HTTP proxies do.\n"
)


@dataclass(frozen=True, slots=True)
class DemoServer:
    host: str
    port: int
    user: str
    identity: str
    known_hosts: str


async def _serve_page(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
    """Answer one HTTP request with the demo page, right on the SSH channel."""
    try:
        with contextlib.suppress(asyncio.IncompleteReadError, asyncssh.Error):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        body = _PAGE.encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
    except (OSError, TimeoutError, asyncssh.Error):
        pass
    finally:
        writer.close()


class _TargetSide(asyncio.Protocol):
    """The TCP socket to the target; everything it sees goes to its :class:`_Relay`."""

    def __init__(self, relay: _Relay) -> None:
        self._relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not isinstance: uvloop's transports do not derive from asyncio's.
        tcp = cast(asyncio.Transport, transport)
        # Read nothing until the channel is up. uvloop starts reading after this method
        # returns whatever it asked, so the relay also keeps what comes before then.
        tcp.pause_reading()
        self._relay.target = tcp

    def data_received(self, data: bytes) -> None:
        self._relay.from_target(data)

    def eof_received(self) -> bool:
        self._relay.target_eof()
        # Keep the socket half open: the client may still be sending; the relay closes it.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.target_lost()

    def pause_writing(self) -> None:
        self._relay.pause_channel()

    def resume_writing(self) -> None:
        self._relay.resume_channel()


class _Relay(asyncssh.SSHTCPSession[bytes]):
    """One direct-tcpip channel spliced to one TCP socket, half-closes passed both ways."""

    def __init__(self) -> None:
        self.target: asyncio.Transport | None = None
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._eof_from_target = False
        self._eof_from_channel = False
        self._target_gone = False
        # What the target sent before the channel was up, passed on once it is.
        self._early: list[bytes] = []
        self._started = False

    # -- the channel (asyncssh calls these) ---------------------------------------------

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan

    def session_started(self) -> None:
        assert self._chan is not None
        self._started = True
        for data in self._early:
            self._chan.write(data)
        self._early.clear()
        if self._target_gone:
            self._chan.close()
            return
        if self._eof_from_target:
            self._chan.write_eof()
            self._finish_if_done()
        if self.target is not None and not self.target.is_closing():
            self.target.resume_reading()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self.target is not None:
            self.target.write(data)

    def eof_received(self) -> bool:
        self._eof_from_channel = True
        if self.target is not None and not self.target.is_closing():
            self.target.write_eof()
        self._finish_if_done()
        # True: asyncssh must not answer with an EOF of its own; the target decides that.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._chan = None
        if self.target is not None:
            self.target.close()

    def pause_writing(self) -> None:
        if self.target is not None and not self.target.is_closing():
            self.target.pause_reading()

    def resume_writing(self) -> None:
        if self.target is not None and not self.target.is_closing():
            self.target.resume_reading()

    # -- the target socket (its protocol calls these) ------------------------------------

    def from_target(self, data: bytes) -> None:
        if self._started and self._chan is not None:
            self._chan.write(data)
        elif not self._started:
            self._early.append(data)

    def target_eof(self) -> None:
        self._eof_from_target = True
        if self._started and self._chan is not None:
            self._chan.write_eof()
            self._finish_if_done()

    def target_lost(self) -> None:
        # A reset, or our own close: either way nothing more can pass, so end the channel.
        self._target_gone = True
        if self._started and self._chan is not None:
            self._chan.close()

    def pause_channel(self) -> None:
        if self._chan is not None:
            self._chan.pause_reading()

    def resume_channel(self) -> None:
        if self._chan is not None:
            self._chan.resume_reading()

    def _finish_if_done(self) -> None:
        # Both directions have ended: close both ends (buffered data is flushed first), as
        # sshd does once the socket and the channel have both reached EOF.
        if self._eof_from_target and self._eof_from_channel:
            if self.target is not None:
                self.target.close()
            if self._chan is not None:
                self._chan.close()


async def _forward(host: str, port: int) -> _Relay:
    """Connect to the target before the channel is confirmed, so a refused or unreachable
    target fails the open (with the reason), as it does on OpenSSH."""
    relay = _Relay()
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_connection(lambda: _TargetSide(relay), host, port)
    except OSError as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
    # Again, for uvloop (see _TargetSide.connection_made): at most one read is kept early.
    transport.pause_reading()
    return relay


class _DemoSSHServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> (
        Callable[[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]], Awaitable[None]]
        | Awaitable[_Relay]
    ):
        if dest_host == DEMO_HOST:
            return _serve_page
        if dest_host == "localhost" or _is_loopback(dest_host):
            return _forward(dest_host, dest_port)
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            "the demo server only forwards to this machine",
        )

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        # -R and SOCKS BIND: the demo listens for them on loopback only.
        return listen_host == "localhost" or _is_loopback(listen_host)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.asynccontextmanager
async def demo_server() -> AsyncIterator[DemoServer]:
    workdir = Path(tempfile.mkdtemp(prefix="pytunnel-demo-"))
    try:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        identity = workdir / "id_ed25519"
        client_key.write_private_key(str(identity))
        server = await asyncssh.create_server(
            _DemoSSHServer,
            "127.0.0.1",
            0,
            server_host_keys=[host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(
                client_key.export_public_key().decode()
            ),
            allow_pty=False,
        )
        port = server.sockets[0].getsockname()[1]
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text(
            f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}\n"
        )
        try:
            yield DemoServer("127.0.0.1", port, getpass.getuser(), str(identity), str(known_hosts))
        finally:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

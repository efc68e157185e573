"""``pytunnel --demo``: a real SSH server on loopback, so a newcomer sees a tunnel work.

The server is asyncssh's, with host and client keys made for this run and thrown away
after it. pytunnel connects to it exactly as to any server (known_hosts file, identity
file, direct-tcpip channels): only the far end is local. The server forwards to this
machine only, and listens for ``-R`` and BIND on loopback only. It also knows one name
of its own, ``pytunnel.demo``, whose small page it serves right on the channel: a name
your own resolver has never heard of, so reaching it proves that DNS goes through the
tunnel (``socks5h://``).
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


class _DemoSSHServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool | Callable[[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]], Awaitable[None]]:
        if dest_host == DEMO_HOST:
            return _serve_page
        if dest_host == "localhost" or _is_loopback(dest_host):
            return True
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

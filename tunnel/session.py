"""The SSH session: connect, authenticate, check host keys, open channels.

This is the only room that imports asyncssh (the demo server aside). asyncssh's
exceptions are translated here, once, into the tree of :mod:`tunnel.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from . import events
from .channels import Channel, ChannelSink
from .config import Config, HostKeyPolicy
from .errors import (
    AuthenticationFailed,
    ChannelOpenFailed,
    ConnectFailed,
    HostKeyRejected,
    ReplyReason,
    SessionClosed,
    SessionError,
    classify_open_failure,
)

log = logging.getLogger(__name__)

# OpenSSH leaves keepalive off; a tunnel that should survive needs it on to notice a
# black-holed network at all (ServerAliveInterval 15 s x ServerAliveCountMax 3).
DEFAULT_KEEPALIVE = 15.0
DEFAULT_KEEPALIVE_COUNT = 3

USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")


# -- channels -----------------------------------------------------------------------


class _Bridge(asyncssh.SSHTCPSession[bytes]):
    """Hands what arrives on a direct-tcpip channel to the proxy's sink."""

    __slots__ = ("_sink",)

    def __init__(self, sink: ChannelSink) -> None:
        self._sink = sink

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        # Hold data back until the proxy has written its SOCKS reply; it resumes then.
        chan.pause_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._sink.remote_data(data)

    def eof_received(self) -> bool:
        self._sink.remote_eof()
        return True

    def pause_writing(self) -> None:
        self._sink.remote_pause()

    def resume_writing(self) -> None:
        self._sink.remote_resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink.remote_closed(exc)


def _close_if_opened(task: asyncio.Task[tuple[Any, Any]]) -> None:
    """An open we stopped waiting for (timeout, client gone) may still succeed: close it
    then, or the server keeps a channel nobody reads."""
    if task.cancelled() or task.exception() is not None:
        return
    chan, _ = task.result()
    chan.close()


# -- host keys ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Verdict:
    changed: bool
    key_type: str
    fingerprint: str
    host: str
    files: tuple[str, ...]


class _HostKeys:
    """Host-key trust as OpenSSH does it: known_hosts files, and StrictHostKeyChecking
    for keys that are not in them. asyncssh matches the files; we decide the rest."""

    def __init__(
        self, policy: HostKeyPolicy, user_files: Sequence[str], global_files: Sequence[str]
    ):
        self.policy = policy
        self.user_files = tuple(os.path.expanduser(p) for p in user_files)
        self.files = self.user_files + tuple(os.path.expanduser(p) for p in global_files)
        self.known_for_host: list[asyncssh.SSHKey] = []
        self.verdict: _Verdict | None = None
        self.recorded = False

    def match(self, host: str, addr: str, port: int | None) -> Any:
        present = [p for p in self.files if os.path.isfile(p)]
        if not present:
            self.known_for_host = []
            return ([], [], [])
        result = asyncssh.read_known_hosts(present).match(host, addr, port)
        self.known_for_host = list(result[0])
        return result

    def decide(self, host: str, port: int, key: asyncssh.SSHKey) -> bool:
        """Called by asyncssh for a key no known_hosts line trusts."""
        same_type = [k for k in self.known_for_host if k.algorithm == key.algorithm]
        self.verdict = _Verdict(
            changed=bool(same_type),
            key_type=key.algorithm.decode("ascii"),
            fingerprint=key.get_fingerprint("sha256"),
            host=_known_hosts_name(host, port),
            files=self.files,
        )
        if same_type or self.policy not in (HostKeyPolicy.ACCEPT_NEW,):
            return False
        self._record(host, port, key)
        return True

    def _record(self, host: str, port: int, key: asyncssh.SSHKey) -> None:
        path = Path(self.user_files[0])
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = (
            f"{_known_hosts_name(host, port)} {key.export_public_key('openssh').decode().strip()}\n"
        )
        with path.open("a", encoding="ascii") as handle:
            handle.write(line)
        self.recorded = True
        log.warning(
            "Permanently added %s (%s) to %s", host, self.verdict and self.verdict.key_type, path
        )

    def error(self) -> HostKeyRejected:
        v = self.verdict
        if v is None:
            return HostKeyRejected("host key verification failed", hint="the host key is revoked")
        where = " or ".join(self.user_files[:1])
        if v.changed:
            return HostKeyRejected(
                f"HOST KEY CHANGED for {v.host}: the server now offers {v.key_type} key "
                f"{v.fingerprint}, which is not the one in known_hosts. Someone may be "
                "intercepting the connection, or the server was reinstalled",
                hint=f"if you know why it changed, remove the old line with "
                f"`ssh-keygen -R '{v.host}'` and connect again",
            )
        return HostKeyRejected(
            f"host key for {v.host} is not known: {v.key_type} {v.fingerprint}",
            hint=f"check the fingerprint with the server's owner, then add it to {where} "
            "(for example with `ssh` once), or use -o StrictHostKeyChecking=accept-new",
        )


def _expand(paths: Sequence[str]) -> list[str]:
    return [os.path.expanduser(path) for path in paths]


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _Client(asyncssh.SSHClient):
    def __init__(self, host_keys: _HostKeys | None) -> None:
        self._host_keys = host_keys
        self.lost_reason = "connection closed by the server"

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.lost_reason = str(exc) or type(exc).__name__

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        return self._host_keys is not None and self._host_keys.decide(host, port, key)


# -- the session --------------------------------------------------------------------


class Session:
    """One SSH connection and the channels opened through it."""

    def __init__(self, config: Config, emit: events.Sink) -> None:
        self.config = config
        self.emit = emit
        self.server = str(config.destination)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._up = asyncio.Event()
        self._lost: asyncio.Future[SessionError] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.attempts = 0

    @property
    def connection(self) -> asyncssh.SSHClientConnection | None:
        return self._conn

    def _host_keys(self) -> _HostKeys | None:
        cfg = self.config
        if cfg.host_key_policy is HostKeyPolicy.NO:
            return None
        return _HostKeys(
            cfg.host_key_policy,
            cfg.known_hosts if cfg.known_hosts is not None else USER_KNOWN_HOSTS,
            cfg.global_known_hosts if cfg.global_known_hosts is not None else GLOBAL_KNOWN_HOSTS,
        )

    async def connect(self) -> None:
        """Connect and authenticate once; raise a :class:`SessionError` if that fails."""
        cfg = self.config
        dest = cfg.destination
        self.attempts += 1
        self.emit(events.SessionConnecting(self.server, self.attempts))
        host_keys = self._host_keys()
        kwargs: dict[str, Any] = {
            "known_hosts": host_keys.match if host_keys is not None else None,
            "connect_timeout": cfg.connect_timeout,
            "config": () if cfg.ssh_config is None else list(cfg.ssh_config),
            "keepalive_interval": (
                DEFAULT_KEEPALIVE if cfg.keepalive_interval is None else cfg.keepalive_interval
            ),
            "keepalive_count_max": (
                DEFAULT_KEEPALIVE_COUNT if cfg.keepalive_count is None else cfg.keepalive_count
            ),
        }
        if dest.user:
            kwargs["username"] = dest.user
        if dest.port:
            kwargs["port"] = dest.port
        if cfg.identities:
            kwargs["client_keys"] = _expand(cfg.identities)
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[SessionError] = loop.create_future()
        client = _Client(host_keys)
        try:
            conn = await asyncssh.connect(dest.host, client_factory=lambda: client, **kwargs)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise (host_keys.error() if host_keys else HostKeyRejected(str(exc))) from exc
        except asyncssh.PermissionDenied as exc:
            raise AuthenticationFailed(
                f"{self.server}: permission denied ({exc.reason})",
                hint=f"tried {self._tried()}; check the user name (-l) and key (-i)",
            ) from exc
        except asyncssh.DisconnectError as exc:
            raise ConnectFailed(f"{self.server}: {exc.reason}") from exc
        except TimeoutError as exc:
            raise ConnectFailed(
                f"{self.server}: connection timed out after {cfg.connect_timeout:g} s",
                hint="check the host and port, or raise -o ConnectTimeout",
            ) from exc
        except socket.gaierror as exc:
            raise ConnectFailed(
                f"could not resolve hostname {dest.host}: {exc.strerror}",
                hint="check the host name or your ssh_config",
            ) from exc
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConnectFailed(f"{self.server}: {reason}") from exc
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError) as exc:
            raise AuthenticationFailed(f"{self.server}: cannot use key: {exc}") from exc
        self._conn = conn
        self._lost = lost
        self._watcher = loop.create_task(self._watch(conn, client, lost))
        self._up.set()
        self.emit(
            events.SessionUp(
                server=self.server,
                server_version=str(conn.get_extra_info("server_version", "")),
                cipher=str(conn.get_extra_info("send_cipher", "")),
                kex="",
                mac=str(conn.get_extra_info("send_mac", "")),
                compression=str(conn.get_extra_info("send_compression", "")),
            )
        )

    def _tried(self) -> str:
        ids = [os.path.expanduser(p) for p in self.config.identities]
        parts = [f"key {p}" for p in ids] or ["the default keys in ~/.ssh"]
        if os.environ.get("SSH_AUTH_SOCK"):
            parts.append("the ssh-agent's keys")
        return ", ".join(parts)

    async def _watch(
        self,
        conn: asyncssh.SSHClientConnection,
        client: _Client,
        lost: asyncio.Future[SessionError],
    ) -> None:
        try:
            await conn.wait_closed()
        finally:
            if self._conn is conn:
                self._conn = None
                self._up.clear()
            if not lost.done():
                lost.set_result(SessionClosed(f"{self.server}: {client.lost_reason}"))

    async def wait_lost(self) -> SessionError:
        """Wait until the live connection ends; return why."""
        assert self._lost is not None, "wait_lost() before connect()"
        return await asyncio.shield(self._lost)

    async def open_tcp(
        self, host: str, port: int, origin: tuple[str, int], sink: ChannelSink
    ) -> Channel:
        timeout = self.config.open_timeout
        loop = asyncio.get_running_loop()
        if self._conn is None:
            # Down between reconnects (or not up yet): wait a bounded time, then fail
            # closed. Never connect anywhere directly.
            wait = self.config.reconnect_wait
            try:
                await asyncio.wait_for(self._up.wait(), wait)
            except TimeoutError:
                raise ChannelOpenFailed(
                    ReplyReason.GENERAL_FAILURE,
                    f"the SSH session is down (waited {wait:g} s for it to come back)",
                ) from None
        deadline = loop.time() + timeout
        conn = self._conn
        if conn is None:
            raise ChannelOpenFailed(ReplyReason.GENERAL_FAILURE, "the SSH session is not up")
        task = loop.create_task(
            conn.create_connection(lambda: _Bridge(sink), host, port, origin[0], origin[1])
        )
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:
            task.add_done_callback(_close_if_opened)
            raise
        if not done:
            task.add_done_callback(_close_if_opened)
            raise ChannelOpenFailed(
                ReplyReason.TTL_EXPIRED, f"no answer from the server within {timeout:g} s"
            )
        try:
            chan, _ = task.result()
        except asyncssh.ChannelOpenError as exc:
            raise ChannelOpenFailed(
                classify_open_failure(exc.code, exc.reason), exc.reason
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise ChannelOpenFailed(
                ReplyReason.GENERAL_FAILURE, f"SSH session failed: {exc}"
            ) from exc
        return chan

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._up.clear()
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5.0)


def enable_protocol_debug() -> None:
    """asyncssh's own packet-level debug output (``-vvv``)."""
    asyncssh.set_debug_level(2)


def default_user() -> str:
    return getpass.getuser()


SessionFactory = Callable[[Config, events.Sink], Session]

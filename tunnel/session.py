"""The SSH session: one connection (through its jump hosts or ProxyCommand), its
authentication, and the channels opened through it. Host-key trust is
:mod:`tunnel.trust`'s, the ProxyCommand process :mod:`tunnel.proxycommand`'s, the
questions :mod:`tunnel.prompts`'s, ssh_config :mod:`tunnel.sshconfig`'s: this room hands
asyncssh what they decide.

With :mod:`tunnel.fastpath` (and the demo server) the only room that uses asyncssh's
connections (:mod:`tunnel.sshconfig` uses its ssh_config parser alone). asyncssh's
exceptions are translated here, once, into the tree of :mod:`tunnel.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh
from asyncssh.public_key import get_default_certificate_algs, get_default_public_key_algs

from . import events, eyeballs, fastpath
from .channels import Channel, ChannelSink, IncomingHandler, IncomingSink, ReportsToSink
from .config import (
    DEFAULT_CONNECT_TIMEOUT,
    AddressFamily,
    Config,
    Destination,
    HostKeyPolicy,
)
from .errors import (
    AuthenticationFailed,
    ChannelOpenFailed,
    ConfigError,
    ConnectFailed,
    HostKeyRejected,
    RemoteCommandEnded,
    ReplyReason,
    SessionClosed,
    SessionError,
    classify_open_failure,
)
from .prompts import PASSWORD_TRIES, ask_in_thread
from .proxycommand import ProxyCommand
from .sshconfig import connect_target, host_key_alias
from .trust import GLOBAL_KNOWN_HOSTS, USER_KNOWN_HOSTS, HostKeys, Key, KeyCodec

log = logging.getLogger(__name__)

# OpenSSH leaves keepalive off; a tunnel that should survive needs it on to notice a
# black-holed network at all (ServerAliveInterval 15 s x ServerAliveCountMax 3).
DEFAULT_KEEPALIVE = 15.0
DEFAULT_KEEPALIVE_COUNT = 3

_ALGORITHM_KWARGS = {
    "kex": "kex_algs",
    "host_key_algorithms": "server_host_key_algs",
    "macs": "mac_algs",
}
_AUTH_KWARGS = {
    "publickey": "public_key_auth",
    "password": "password_auth",
    "keyboard-interactive": "kbdint_auth",
}
_FAMILIES = {AddressFamily.INET: socket.AF_INET, AddressFamily.INET6: socket.AF_INET6}

# With AES instructions, AES-GCM costs a fraction of chacha20-poly1305 in asyncssh (one
# cipher object per packet there). Put it first; keep everything else so any server works.
_AES_GCM_FIRST = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"


def _cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            return any(line.startswith(("flags", "Features")) and " aes" in line for line in handle)
    except OSError:
        return False


def preferred_ciphers() -> tuple[str, ...] | str:
    """The cipher order to offer when the user chose none."""
    return _AES_GCM_FIRST if _cpu_has_aes() else ()


# OpenSSH's default identity files, in its order.
DEFAULT_IDENTITIES = (
    "~/.ssh/id_rsa",
    "~/.ssh/id_ecdsa",
    "~/.ssh/id_ecdsa_sk",
    "~/.ssh/id_ed25519",
    "~/.ssh/id_ed25519_sk",
    "~/.ssh/id_dsa",
)

# What trust needs of asyncssh: reading a known_hosts key, the algorithms it offers.
ASYNCSSH_KEYS = KeyCodec(
    load=asyncssh.import_public_key,
    algorithms=(*get_default_certificate_algs(), *get_default_public_key_algs()),
)


# -- channels -----------------------------------------------------------------------


class _Bridge(ReportsToSink, asyncssh.SSHTCPSession[bytes]):
    """Hands what arrives on a direct-tcpip channel to the proxy's sink."""

    __slots__ = ("_conn", "_session", "_sink")

    def __init__(self, sink: ChannelSink, session: Session) -> None:
        self._sink = sink
        self._session = session
        self._conn: object = None

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        # Counted here and uncounted in connection_lost, so that an open nobody waited
        # for (timed out, then closed) balances too.
        self._session.channels += 1
        # Per connection too: a retired one is closed when its last channel ends.
        self._conn = chan.get_extra_info("connection")
        self._session._channel_opened(self._conn)
        # Hold data back until the proxy has written its SOCKS reply; it resumes then.
        chan.pause_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._sink.remote_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._session.channels -= 1
        self._session._channel_closed(self._conn)
        self._sink.remote_closed(exc)


class _IncomingBridge(_Bridge):
    """A forwarded-tcpip channel: a connection to a port the server listens on for us."""

    __slots__ = ("_incoming",)

    def __init__(self, sink: IncomingSink, session: Session) -> None:
        super().__init__(sink, session)
        self._incoming = sink

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        super().connection_made(chan)
        # Paused, like an opened channel: the sink resumes it once it is ready.
        self._incoming.channel_opened(chan)


@dataclass(frozen=True, slots=True)
class _Listening:
    """A port the server listens on for us (a :class:`RemoteListener`)."""

    listener: asyncssh.SSHListener
    host: str
    port: int

    def close(self) -> None:
        # Sends cancel-tcpip-forward; a connection that is already gone needs nothing.
        with contextlib.suppress(Exception):
            self.listener.close()


# How much of a remote program's stderr is kept to explain why it ended.
_STDERR_KEPT = 2048


class _Process(ReportsToSink, asyncssh.SSHClientSession[bytes]):
    """A program on the server: stdout to the sink, stderr kept, the exit status noted."""

    def __init__(self, sink: ChannelSink) -> None:
        self._sink = sink
        self._stderr = bytearray()
        self._status: int | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        chan.pause_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self._stderr += data
            del self._stderr[:-_STDERR_KEPT]
        else:
            self._sink.remote_data(data)

    def exit_status_received(self, status: int) -> None:
        self._status = status

    def connection_lost(self, exc: Exception | None) -> None:
        stderr = self._stderr.decode("utf-8", "replace")
        self._sink.remote_closed(exc or RemoteCommandEnded(self._status, stderr))


def _close_if_opened(task: asyncio.Task[tuple[Any, Any]]) -> None:
    """An open we stopped waiting for (timeout, client gone) may still succeed: close it
    then, or the server keeps a channel nobody reads."""
    if task.cancelled() or task.exception() is not None:
        return
    chan, _ = task.result()
    chan.close()


def _is_encrypted_key(filename: str) -> bool:
    """Whether a private key file needs a passphrase (asyncssh asks about every file)."""
    try:
        asyncssh.read_private_key(filename)
    except asyncssh.KeyEncryptionError:
        return True
    except asyncssh.KeyImportError as exc:
        return "passphrase" in str(exc).lower()
    except OSError:
        return False
    return False


def _same(client: _Client) -> _Client:
    return client


def _exists(path: str) -> bool:
    # A stat of a local key file: not worth a thread.
    return os.path.exists(path)


def _expand(paths: Sequence[str]) -> list[str]:
    return [os.path.expanduser(path) for path in paths]


class _Client(asyncssh.SSHClient):
    def __init__(
        self, host_keys: HostKeys | None, prompter: events.Prompter | None, server: str
    ) -> None:
        self._host_keys = host_keys
        self._prompter = prompter
        self._server = server
        self.lost_reason = "connection closed by the server"
        self.password_tries = 0
        self.kbdint_rounds = 0
        self._kbdint_waiting = False
        self._kbdint_unanswered = False

    def auth_banner_received(self, msg: str, lang: str) -> None:
        if self._prompter is not None:
            self._prompter.show(msg)

    async def password_auth_requested(self) -> str | None:
        if self._prompter is None or self.password_tries >= PASSWORD_TRIES:
            return None
        again = "Permission denied, please try again.\n" if self.password_tries else ""
        self.password_tries += 1
        return await ask_in_thread(self._prompter, f"{again}{self._server}'s password: ", False)

    def kbdint_auth_requested(self) -> str | None:
        # A server may offer keyboard-interactive and then send no challenge for this
        # user: after one such round, move on to the next method instead of looping.
        if self._prompter is None or self._kbdint_unanswered:
            return None
        if self._kbdint_waiting:
            self._kbdint_unanswered = True
            return None
        self._kbdint_waiting = True
        return ""

    async def kbdint_challenge_received(
        self, name: str, instructions: str, lang: str, prompts: Sequence[tuple[str, bool]]
    ) -> list[str] | None:
        self._kbdint_waiting = False
        prompter = self._prompter
        if prompter is None or self.kbdint_rounds >= PASSWORD_TRIES * 2:
            return None
        self.kbdint_rounds += 1
        # The server's name and instructions go with the first question, in one piece.
        preamble = "".join(text.rstrip("\n") + "\n" for text in (name, instructions) if text)
        answers: list[str] = []
        for prompt, echo in prompts:
            answer = await ask_in_thread(prompter, preamble + prompt, echo)
            preamble = ""
            if answer is None:
                return None
            answers.append(answer)
        return answers

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.lost_reason = str(exc) or type(exc).__name__

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        return self._host_keys is not None and self._host_keys.decide(host, addr, port, key)


# -- the session --------------------------------------------------------------------


class Session:
    """One SSH connection and the channels opened through it."""

    def __init__(
        self, config: Config, emit: events.Sink, prompter: events.Prompter | None = None
    ) -> None:
        self.config = config
        self.emit = emit
        self.prompter = prompter
        self.server = str(config.destination)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._up = asyncio.Event()
        self._lost: asyncio.Future[SessionError] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._hops: list[asyncssh.SSHClientConnection] = []
        # A Session per jump host, kept across reconnects: each hop has its own settings
        # (its ssh_config block), keys and accepted host keys. A Config made without
        # apply_ssh_config has jump hosts but no hops: each gets the same settings then.
        hops = config.hops or tuple(
            dataclasses.replace(config, destination=hop, jump_hosts=None, proxy_run=None)
            for hop in config.jump_hosts or ()
        )
        self._proxies: list[ProxyCommand] = []
        self._decrypted: dict[str, asyncssh.SSHKey] = {}
        self._missing: set[str] = set()
        # Encrypted keys no passphrase was had for (no terminal, BatchMode, given up).
        self._locked: set[str] = set()
        self._hop_sessions = [Session(hop, emit, prompter) for hop in hops]
        for hop_session in self._hop_sessions:
            # A key file used for several hops is decrypted (and reported missing) once.
            hop_session._decrypted = self._decrypted
            hop_session._missing = self._missing
            hop_session._locked = self._locked
        self._accepted_host_keys: set[Key] = set()
        # Channel opens we stopped waiting for, each closing its channel if it opens late:
        # cancelled and awaited by close().
        self._opening: set[asyncio.Task[Any]] = set()
        # Channels open now, for the pool's "least loaded first".
        self.channels = 0
        self.attempts = 0
        # Channels open on each connection, and the retired connections' waits for
        # their last one to end (SIGHUP: old channels finish on the old connection).
        self._open_on: dict[object, int] = {}
        self._idle: dict[object, asyncio.Event] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def connect_timeout(self) -> float:
        timeout = self.config.connect_timeout
        return DEFAULT_CONNECT_TIMEOUT if timeout is None else timeout

    @property
    def connection(self) -> asyncssh.SSHClientConnection | None:
        return self._conn

    def _host_keys(self, dest: Destination) -> HostKeys:
        cfg = self.config
        return HostKeys(
            ASYNCSSH_KEYS,
            cfg.host_key_policy or HostKeyPolicy.ASK,
            cfg.known_hosts if cfg.known_hosts is not None else USER_KNOWN_HOSTS,
            cfg.global_known_hosts if cfg.global_known_hosts is not None else GLOBAL_KNOWN_HOSTS,
            None if cfg.batch_mode else self.prompter,
            self._accepted_host_keys,
            host_key_alias(cfg, dest),
        )

    def _connect_kwargs(self, host_keys: HostKeys | None) -> dict[str, Any]:
        """asyncssh's options for one connection. What is not given here, asyncssh takes
        from ssh_config, then from its defaults."""
        cfg = self.config
        kwargs: dict[str, Any] = {
            "known_hosts": host_keys.match if host_keys is not None else None,
            "connect_timeout": self.connect_timeout,
            "config": () if cfg.ssh_config is None else list(cfg.ssh_config),
            "keepalive_interval": (
                DEFAULT_KEEPALIVE if cfg.keepalive_interval is None else cfg.keepalive_interval
            ),
            "keepalive_count_max": (
                DEFAULT_KEEPALIVE_COUNT if cfg.keepalive_count is None else cfg.keepalive_count
            ),
            # ssh's default is no compression; asyncssh would otherwise offer zlib first.
            "compression_algs": "zlib@openssh.com,zlib,none" if cfg.compression else "none",
            "encryption_algs": cfg.algorithms.get("ciphers", preferred_ciphers()),
        }
        for field, name in _ALGORITHM_KWARGS.items():
            if field in cfg.algorithms:
                kwargs[name] = cfg.algorithms[field]
        for method, allowed in cfg.auth_methods.items():
            kwargs[_AUTH_KWARGS[method]] = allowed
        if cfg.preferred_auth is not None:
            kwargs["preferred_auth"] = list(cfg.preferred_auth)
        if cfg.identities and cfg.identities_only:
            kwargs["agent_identities"] = _expand(cfg.identities)
        # Encrypted keys are decrypted by _client_keys (or skipped): asyncssh never asks.
        kwargs["ignore_encrypted"] = True
        if cfg.address_family not in (None, AddressFamily.ANY):
            kwargs["family"] = _FAMILIES[cfg.address_family]
        return kwargs

    async def _open_connection(
        self,
        dest: Destination,
        tunnel: asyncssh.SSHClientConnection | None,
        what: str,
        proxies: list[ProxyCommand],
        *,
        jump: bool = False,
        via: str = "",
    ) -> tuple[asyncssh.SSHClientConnection, _Client]:
        """One SSH connection (to a jump host or the server), errors translated. The
        first connection of a chain runs the ProxyCommand, if any (added to proxies)."""
        cfg = self.config
        # What to check when the connection cannot be made: -p is about the final host;
        # a jump host's address comes from -J or ProxyJump.
        check = "the jump host (-J, or ProxyJump in ssh_config)" if jump else "the port (-p)"
        host_keys = self._host_keys(dest)
        kwargs = self._connect_kwargs(host_keys)
        if dest.user:
            kwargs["username"] = dest.user
        if dest.port:
            kwargs["port"] = dest.port
        # Explicit, so that asyncssh never follows ssh_config's ProxyJump or ProxyCommand
        # on its own (without our host-key checks, keys and errors): the route is ours.
        kwargs["tunnel"] = tunnel
        kwargs["proxy_command"] = None
        use_proxy = tunnel is None and cfg.proxy_run is not None
        if host_keys is not None and "host_key_algorithms" not in cfg.algorithms:
            preferred = host_keys.preferred_algorithms(dest.host, dest.port)
            if preferred is not None:
                kwargs["server_host_key_algs"] = [alg.decode("ascii") for alg in preferred]
        prompter = None if cfg.batch_mode else self.prompter
        keys = await self._client_keys(prompter)
        if keys is not None:
            kwargs["client_keys"] = keys
        # -v: where we go, how, and with what (file names only; never a secret).
        if log.isEnabledFor(logging.INFO):
            host, port, user = connect_target(cfg, dest)
            log.info(
                "connecting to %s port %d%s as %s; keys: %s",
                host,
                port,
                f" through jump host {via}"
                if tunnel is not None
                else (" through ProxyCommand" if use_proxy else ""),
                user or "the local user",
                ", ".join(str(k) if isinstance(k, str) else "a decrypted key" for k in keys)
                if keys is not None
                else "asyncssh's defaults and the agent",
            )
        while True:
            client = _Client(host_keys, prompter, str(dest))
            proxy: ProxyCommand | None = None
            if use_proxy:
                assert cfg.proxy_run is not None
                proxy = await ProxyCommand.start(cfg.proxy_command or "", cfg.proxy_run, self.emit)
                proxies.append(proxy)
                kwargs["sock"] = proxy.sock
            try:
                if tunnel is None and proxy is None:
                    await self._dial(dest, kwargs)
                conn = await self._connect_once(dest.host, client, kwargs, proxy)
            except asyncssh.HostKeyNotVerifiable as exc:
                if (
                    host_keys is not None
                    and host_keys.pending is not None
                    and await host_keys.ask()
                ):
                    continue  # accepted: connect again, now trusting the key
                raise (host_keys.error() if host_keys else HostKeyRejected(str(exc))) from exc
            except asyncssh.PermissionDenied as exc:
                # asyncssh's reason ("Permission denied for user X on host Y") would say
                # it twice: only the user is taken from it.
                named = re.search(r"for user (\S+)", exc.reason)
                user = f" for user {named.group(1)}" if named else ""
                message = f"{what}: permission denied{user}: tried {self._tried(client)}"
                if cfg.batch_mode or prompter is None:
                    message += "; no password was asked for (BatchMode or no terminal)"
                message += "; check the user name and the key (-l, -i)"
                raise AuthenticationFailed(message) from exc
            except asyncssh.ConnectionLost as exc:
                raise ConnectFailed(
                    f"{what}: {exc.reason}",
                    hint="the server closed the connection before SSH was set up: is it an "
                    f"SSH server? check {check}",
                ) from exc
            except asyncssh.DisconnectError as exc:
                raise ConnectFailed(f"{what}: {exc.reason}") from exc
            except TimeoutError as exc:
                raise ConnectFailed(
                    f"{what}: connection timed out after {self.connect_timeout:g} s",
                    hint=f"check {check}, or raise -o ConnectTimeout"
                    if jump
                    else "check the host and port, or raise -o ConnectTimeout",
                ) from exc
            except socket.gaierror as exc:
                raise ConnectFailed(
                    f"could not resolve hostname {dest.host}: {exc.strerror}",
                    hint="check the host name or your ssh_config",
                ) from exc
            except OSError as exc:
                reason = exc.strerror or str(exc)
                port = kwargs.get("port", "from ssh_config, or 22")
                raise ConnectFailed(
                    f"{what}: cannot connect to {dest.host} port {port}: {reason}",
                    hint="is sshd running there? "
                    + (f"check {check}" if jump else "check the host and the port (-p)"),
                ) from exc
            except asyncssh.ConfigParseError as exc:
                # asyncssh reads ssh_config again for each connection, and some lines
                # ssh takes (${VAR} unset here, in a ProxyCommand) it cannot.
                raise ConfigError(f"in ssh_config, for {dest.host}: {exc}") from exc
            except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError) as exc:
                raise AuthenticationFailed(f"{what}: cannot use key: {exc}") from exc
            else:
                log.info(
                    "%s: authenticated; kex %s, cipher %s, mac %s, server %s",
                    what,
                    conn.get_extra_info("kex", "unknown"),
                    conn.get_extra_info("send_cipher"),
                    conn.get_extra_info("send_mac"),
                    conn.get_extra_info("server_version"),
                )
                return conn, client

    async def _dial(self, dest: Destination, kwargs: dict[str, Any]) -> None:
        """Connect the TCP socket by Happy Eyeballs (IPv6 first, the next address after
        250 ms) and put it in ``kwargs`` for asyncssh, with what is left of the
        ConnectTimeout for the SSH handshake (as ssh counts it)."""
        loop = asyncio.get_running_loop()
        host, port, _ = connect_target(self.config, dest)
        chosen = self.config.address_family
        family = socket.AF_UNSPEC if chosen is None else _FAMILIES.get(chosen, socket.AF_UNSPEC)

        def attempt(info: eyeballs.AddrInfo) -> None:
            log.info("trying %s port %d", info[4][0], info[4][1])

        deadline = loop.time() + self.connect_timeout
        # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns the socket of a
        # connect that completes just as the task is cancelled and loses the cancellation
        # (a SIGTERM right then left the SSH handshake waiting on a mute server).
        async with asyncio.timeout(self.connect_timeout):
            sock = await eyeballs.open_socket(host, port, family, on_attempt=attempt)
        log.info("connected to %s port %d", *sock.getpeername()[:2])
        kwargs["sock"] = sock
        kwargs["connect_timeout"] = max(deadline - loop.time(), 0.001)

    async def _connect_once(
        self, host: str, client: _Client, kwargs: dict[str, Any], proxy: ProxyCommand | None
    ) -> asyncssh.SSHClientConnection:
        """asyncssh.connect, through the fast path's connection class. Through a
        ProxyCommand, a failed attempt stops the command, and a lost connection or a
        broken pipe is told as the command's own failure when the command ended (with
        what it said), not as a puzzling "Broken pipe"."""
        try:
            conn = await fastpath.connect(
                host, self._refused, client_factory=functools.partial(_same, client), **kwargs
            )
        except BaseException as exc:
            if proxy is None:
                raise
            failure = None
            if isinstance(exc, (OSError, asyncssh.ConnectionLost)):
                failure = await proxy.failure()
            proxy.stop()  # first: whatever interrupts what follows, the command ends
            await proxy.drop_socket()
            if failure is not None:
                raise failure from exc
            raise
        return conn

    async def connect(
        self,
        *,
        demand: bool = False,
        cause: str | None = None,
        outage: Callable[[], float | None] | None = None,
    ) -> None:
        """Connect (through any jump hosts) and authenticate once; raise a
        :class:`SessionError` if that fails. The keeper says why it connects now:
        ``demand`` (a client waits), ``cause`` of the reconnect, and ``outage`` (read
        as the session comes up: how long service was out) for the events."""
        cfg = self.config
        self.attempts += 1
        self.emit(events.SessionConnecting(self.server, self.attempts, demand))
        loop = asyncio.get_running_loop()
        hops: list[asyncssh.SSHClientConnection] = []
        try:
            tunnel: asyncssh.SSHClientConnection | None = None
            via = ""  # the jump host the next connection goes through
            for hop_session in self._hop_sessions:
                hop = hop_session.config.destination
                tunnel, _ = await hop_session._open_connection(
                    hop, tunnel, f"jump host {hop}", self._proxies, jump=True, via=via
                )
                hops.append(tunnel)
                via = str(hop)
            conn, client = await self._open_connection(
                cfg.destination, tunnel, self.server, self._proxies, via=via
            )
        except BaseException:
            for hop_conn in reversed(hops):
                hop_conn.abort()
            self._stop_proxies()
            raise
        lost: asyncio.Future[SessionError] = loop.create_future()
        self._conn = conn
        self._hops = hops
        self._lost = lost
        self._watcher = loop.create_task(self._watch(conn, client, lost))
        self._up.set()
        self.emit(
            events.SessionUp(
                server=self.server,
                server_version=str(conn.get_extra_info("server_version", "")),
                cipher=str(conn.get_extra_info("send_cipher", "")),
                # Known through the fast path only (stock asyncssh does not say): "" there.
                kex=str(conn.get_extra_info("kex", "")),
                mac=str(conn.get_extra_info("send_mac", "")),
                compression=str(conn.get_extra_info("send_compression", "")),
                cause=cause,
                outage=None if outage is None else outage(),
            )
        )

    async def _client_keys(self, prompter: events.Prompter | None) -> list[Any] | None:
        """The identities to offer: -i and ssh_config's IdentityFile together (as ssh),
        or, with none given, the default files. Missing files are reported once and
        skipped; encrypted ones are decrypted here, asking for the passphrase in a thread
        (three tries), once per run. None: leave it all to asyncssh's defaults."""
        given = _expand(self.config.identities)
        paths = given or [p for p in _expand(DEFAULT_IDENTITIES) if _exists(p)]
        keys: list[Any] = []
        decrypted_any = False
        for path in paths:
            if path in self._decrypted:
                keys.append(self._decrypted[path])
                decrypted_any = True
            elif not _exists(path):
                if path not in self._missing:
                    self._missing.add(path)
                    self.emit(events.Notice(f"identity file {path} not accessible: no such file"))
            elif _is_encrypted_key(path):
                key = None if prompter is None else await self._decrypt(path, prompter)
                if key is not None:
                    self._decrypted[path] = key
                    keys.append(key)
                    decrypted_any = True
                else:
                    self._locked.add(path)
            else:
                keys.append(path)
        return keys if given or decrypted_any else None

    async def _decrypt(self, path: str, prompter: events.Prompter) -> asyncssh.SSHKey | None:
        again = ""
        for _ in range(PASSWORD_TRIES):
            answer = await ask_in_thread(
                prompter, f"{again}Enter passphrase for key '{path}': ", False
            )
            if answer is None:
                return None
            try:
                return asyncssh.read_private_key(path, answer)
            except (asyncssh.KeyEncryptionError, asyncssh.KeyImportError):
                again = "Bad passphrase, try again.\n"
        return None

    def _tried(self, client: _Client) -> str:
        ids = _expand(self.config.identities)
        # A missing file was reported when it was found missing: not tried, not repeated.
        parts = [
            f"key {p} (encrypted, no passphrase given)" if p in self._locked else f"key {p}"
            for p in ids
            if p not in self._missing
        ]
        if not ids:
            parts = ["the default keys in ~/.ssh"]
        if os.environ.get("SSH_AUTH_SOCK") and not self.config.identities_only:
            parts.append("the ssh-agent's keys")
        if client.password_tries:
            parts.append(f"{client.password_tries} password(s)")
        if client.kbdint_rounds:
            parts.append("keyboard-interactive")
        return ", ".join(parts) or "no key (no identity file could be read)"

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
                for hop in reversed(self._hops):
                    hop.close()
                self._hops = []
                self._stop_proxies()
            if not lost.done():
                lost.set_result(SessionClosed(self.server, client.lost_reason))

    def _channel_opened(self, conn: object) -> None:
        self._open_on[conn] = self._open_on.get(conn, 0) + 1

    def _channel_closed(self, conn: object) -> None:
        left = self._open_on.get(conn, 0) - 1
        if left > 0:
            self._open_on[conn] = left
            return
        self._open_on.pop(conn, None)
        idle = self._idle.get(conn)
        if idle is not None:
            idle.set()

    def retire(self, keep_open: float) -> None:
        """Take the live connection out of service: new requests wait for the next
        :meth:`connect`, while channels open on it run on until the last one ends, for
        at most ``keep_open`` seconds; then it is closed with its jump hosts and
        ProxyCommand. Owned by the session (``close`` ends it at once)."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        self._up.clear()
        hops, self._hops = self._hops, []
        proxies, self._proxies = self._proxies, []
        watcher, self._watcher = self._watcher, None
        idle = self._idle[conn] = asyncio.Event()
        if not self._open_on.get(conn):
            idle.set()
        task = asyncio.get_running_loop().create_task(
            self._retire(conn, hops, proxies, watcher, idle, keep_open)
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(
        self,
        conn: asyncssh.SSHClientConnection,
        hops: list[asyncssh.SSHClientConnection],
        proxies: list[ProxyCommand],
        watcher: asyncio.Task[None] | None,
        idle: asyncio.Event,
        keep_open: float,
    ) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), keep_open)
        finally:
            self._idle.pop(conn, None)
            self._open_on.pop(conn, None)
            conn.close()
            for hop in reversed(hops):
                hop.close()
            for proxy in proxies:
                proxy.stop()
            if watcher is not None:
                # It ends with the connection (and resolves the old wait_lost then).
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

    def _stop_proxies(self) -> None:
        proxies, self._proxies = self._proxies, []
        for proxy in proxies:
            proxy.stop()

    async def probe(self, within: float) -> bool:
        """Whether the server answers a keepalive request within ``within`` seconds
        (any answer counts: OpenSSH replies "failure" to keepalive@openssh.com). False
        when there is no connection."""
        conn = self._conn
        if conn is None:
            return False
        # asyncssh sends its own keepalives through this method and has no public one
        # that waits for the reply (present in every asyncssh pytunnel supports).
        request = conn._make_global_request
        try:
            await asyncio.wait_for(request(b"keepalive@openssh.com"), within)
        except (TimeoutError, asyncssh.Error, OSError):
            return False
        return conn is self._conn

    async def wait_lost(self) -> SessionError:
        """Wait until the live connection ends; return why."""
        assert self._lost is not None, "wait_lost() before connect()"
        return await asyncio.shield(self._lost)

    async def _live(self) -> asyncssh.SSHClientConnection:
        """The connection, waiting a bounded time when it is down between reconnects (or
        not up yet); then fail closed. Never connect anywhere directly."""
        if self._conn is None:
            wait = self.config.reconnect_wait
            try:
                await asyncio.wait_for(self._up.wait(), wait)
            except TimeoutError:
                raise ChannelOpenFailed(
                    ReplyReason.GENERAL_FAILURE,
                    f"the SSH session is down (waited {wait:g} s for it to come back)",
                ) from None
        conn = self._conn
        if conn is None:
            raise ChannelOpenFailed(ReplyReason.GENERAL_FAILURE, "the SSH session is not up")
        return conn

    async def wait_up(self) -> None:
        await self._up.wait()

    async def open_tcp(
        self, host: str, port: int, origin: tuple[str, int], sink: ChannelSink
    ) -> Channel:
        timeout = self.config.open_timeout
        loop = asyncio.get_running_loop()
        conn = await self._live()
        deadline = loop.time() + timeout
        task = loop.create_task(
            conn.create_connection(lambda: _Bridge(sink, self), host, port, origin[0], origin[1])
        )
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
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

    def _abandon(self, task: asyncio.Task[tuple[Any, Any]]) -> None:
        """An open nobody waits for any more: closed if it succeeds, owned until done."""
        task.add_done_callback(_close_if_opened)
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def listen_tcp(self, host: str, port: int, handler: IncomingHandler) -> _Listening:
        """``tcpip-forward``: the server listens on host:port ("" every interface,
        "localhost" loopback, 0 a port it picks) and sends each connection back to us.
        ``handler`` is called for none of them before this has returned."""
        conn = await self._live()
        where = f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
        # asyncssh hands a connection over as soon as it has registered the listener
        # (the fast path even before): the caller learns of the listener only when this
        # returns, so each open waits for that. True once returned, False if it failed.
        returned: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        bound: list[tuple[str, int]] = []

        async def accept(orig_host: str, orig_port: int) -> _IncomingBridge:
            origin = (orig_host, orig_port)
            if not await asyncio.shield(returned):
                reason = f"listening on {where} failed"
                self._refused((host, port), origin, reason)
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, reason)
            try:
                sink = handler(origin)
            except Exception as exc:
                # A bug here must cost this one connection, not hang it or the session.
                log.debug("incoming connection handler failed", exc_info=True)
                self._refused(bound[0], origin, f"internal error: {exc!r}")
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_CONNECT_FAILED, "internal error in pytunnel"
                ) from exc
            if sink is None:
                self._refused(
                    bound[0], origin, "its listener takes no more connections, or none from there"
                )
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "refused by pytunnel"
                )
            return _IncomingBridge(sink, self)

        try:
            listener = await self._ask_to_listen(conn, accept, host, port, where)
        except BaseException:
            returned.set_result(False)
            raise
        bound.append((host, listener.get_port()))
        # Where peers should connect. "localhost" stays a name: sshd binds the loopback
        # of each family it can and succeeds if one works, so only the name is sure to
        # reach it. For every interface, the server's address as we reached it.
        address = host
        if host == "":
            peer = conn.get_extra_info("peername")
            address = str(peer[0]) if peer else "0.0.0.0"
        # Set last: the opens waiting in accept resume only once the caller has run on to
        # its next await, and so holds the listener by then.
        returned.set_result(True)
        return _Listening(listener, address, listener.get_port())

    async def _ask_to_listen(
        self,
        conn: asyncssh.SSHClientConnection,
        accept: fastpath.SessionFactory,
        host: str,
        port: int,
        where: str,
    ) -> asyncssh.SSHListener:
        try:
            return await asyncio.wait_for(
                fastpath.listen(conn, accept, host, port), self.config.open_timeout
            )
        except TimeoutError:
            raise ChannelOpenFailed(
                ReplyReason.TTL_EXPIRED, f"no answer to listening on {where}"
            ) from None
        except asyncssh.ChannelListenError as exc:
            raise ChannelOpenFailed(
                ReplyReason.CONNECTION_NOT_ALLOWED,
                f"the server refused to listen on {where} (its AllowTcpForwarding, "
                "PermitListen or GatewayPorts, or the port is taken)",
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise ChannelOpenFailed(
                ReplyReason.GENERAL_FAILURE, f"SSH session failed: {exc}"
            ) from exc

    def _refused(self, listen: tuple[str, int], origin: tuple[str, int], reason: str) -> None:
        """A connection the server accepted for us, refused: never silently."""
        host, port = listen
        client = f"[{origin[0]}]:{origin[1]}" if ":" in origin[0] else f"{origin[0]}:{origin[1]}"
        log.info("refused a connection from %s to %s port %s: %s", client, host, port, reason)
        self.emit(events.IncomingRefused(host, port, client, reason))

    async def run_process(self, command: str, sink: ChannelSink) -> Channel:
        """Run ``command`` on the server (an exec channel, no terminal)."""
        conn = await self._live()
        try:
            chan, _ = await asyncio.wait_for(
                conn.create_session(lambda: _Process(sink), command, encoding=None),
                self.config.open_timeout,
            )
        except TimeoutError:
            raise ChannelOpenFailed(
                ReplyReason.TTL_EXPIRED, "the server did not start the command in time"
            ) from None
        except asyncssh.ChannelOpenError as exc:
            raise ChannelOpenFailed(
                classify_open_failure(exc.code, exc.reason), exc.reason
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise ChannelOpenFailed(
                ReplyReason.GENERAL_FAILURE, f"SSH session failed: {exc}"
            ) from exc
        return chan

    @property
    def is_up(self) -> bool:
        return self._conn is not None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        hops, self._hops = self._hops, []
        self._up.clear()
        tasks = [
            *self._opening,
            *self._retiring,
            *([self._watcher] if self._watcher is not None else []),
        ]
        self._watcher = None
        for task in tasks:
            task.cancel()
        for each in [c for c in (conn,) if c is not None] + hops[::-1]:
            each.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(each.wait_closed(), 5.0)
        proxies, self._proxies = self._proxies, []
        for proxy in proxies:
            await proxy.wait_stopped()
        # The watcher and abandoned opens end with the connection; gather collects
        # their outcomes (a cancelled open is what we asked for).
        await asyncio.gather(*tasks, return_exceptions=True)


def enable_protocol_debug() -> None:
    """asyncssh's own packet-level debug output (``-vvv``)."""
    asyncssh.set_debug_level(2)

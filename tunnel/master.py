"""An OpenSSH ControlMaster as the way out: :class:`MasterUpstream` opens each request as
a channel through the master's socket (:mod:`tunnel.mux`, proxy mode) and keeps the
socket: when the master goes away the listeners stay up, requests wait up to
``--reconnect-wait`` and then fail closed, and the master is asked again with backoff
(sooner when a request is waiting) until one answers.

pytunnel never becomes a master and never authenticates on this path.
"""

from __future__ import annotations

import asyncio
import contextlib
import random as _random
from collections.abc import Callable
from typing import NoReturn

from . import events
from .channels import Channel, ChannelSink, LendingSink
from .config import Config
from .errors import ChannelOpenFailed, ConnectFailed, ReplyReason, SessionClosed, TunnelError
from .mux import HANDOVER_SUPPORTED, MuxClient, open_handover, open_stdio
from .retry import backoff
from .tasks import raise_if_cancelling
from .upstreams import Request

TRANSPORT = "openssh-master"
# How long the master gets to answer the hello, ALIVE_CHECK and MUX_C_PROXY.
_ANSWER_TIMEOUT = 10.0


async def _connect(path: str) -> MuxClient:
    try:
        return await MuxClient.connect(path, _ANSWER_TIMEOUT)
    except FileNotFoundError:
        raise ConnectFailed(f"no OpenSSH master at {path} (no such socket)") from None
    except TimeoutError:
        raise ConnectFailed(f"the OpenSSH master at {path} does not answer") from None
    except OSError as exc:
        raise ConnectFailed(f"no OpenSSH master at {path}: {exc.strerror or exc}") from exc
    except TunnelError as exc:
        raise ConnectFailed(f"cannot use the OpenSSH master at {path}: {exc.message}") from exc


class MasterUpstream:
    """Requests as ``direct-tcpip`` channels through a ControlMaster (the Upstream
    protocol of :mod:`tunnel.upstreams`)."""

    name = TRANSPORT

    def __init__(
        self,
        path: str,
        config: Config,
        emit: events.Sink,
        *,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.path = path
        self.config = config
        self.emit = emit
        self.random = random
        self.server = f"OpenSSH master {path}"
        self._client: MuxClient | None = None
        self._up = asyncio.Event()
        self._demand = asyncio.Event()
        self.reconnects = 0

    @property
    def pid(self) -> int:
        return self._client.pid if self._client is not None else 0

    async def start(self) -> None:
        """Nothing to do: :func:`master_upstream` found the master answering."""

    async def connect(self) -> None:
        """Ask the master once; ConnectFailed when none answers."""
        client = await _connect(self.path)
        self._client = client
        self._up.set()

    async def open(self, request: Request, sink: ChannelSink) -> Channel:
        client = self._client
        if client is None or client.closed:
            # A waiting request asks the keeper to try the master now, not at its
            # next backoff step.
            self._demand.set()
            wait = self.config.reconnect_wait
            try:
                await asyncio.wait_for(self._up.wait(), wait)
            except TimeoutError:
                raise ChannelOpenFailed(
                    ReplyReason.GENERAL_FAILURE,
                    f"the OpenSSH master at {self.path} is gone "
                    f"(waited {wait:g} s for it to come back)",
                ) from None
            client = self._client
            if client is None or client.closed:
                raise ChannelOpenFailed(
                    ReplyReason.GENERAL_FAILURE, f"the OpenSSH master at {self.path} is gone"
                )
        mode = self.config.master_mode
        if mode == "proxy":
            return await client.open_tcp(
                request.host, request.port, request.origin, sink, self.config.open_timeout
            )
        if (
            mode == "handover"
            and HANDOVER_SUPPORTED
            and isinstance(sink, LendingSink)
            and (lent := sink.lend_socket()) is not None
        ):
            return await open_handover(
                self.path, request.host, request.port, sink, lent, self.config.open_timeout
            )
        # stdio mode; or handover where something was pipelined after the request, the
        # client is no TCP socket, or this is no Linux: the master relays a socket pair.
        return await open_stdio(
            self.path, request.host, request.port, sink, self.config.open_timeout
        )

    async def keep_up(self) -> NoReturn:
        """Watch the master; when it goes, ask again with backoff until one answers.
        Raises only with ``--no-reconnect``."""
        while True:
            client = self._client
            assert client is not None, "keep_up() before connect()"
            error = await asyncio.shield(client.lost)
            self._up.clear()
            self._client = None
            lost_at = asyncio.get_running_loop().time()
            reason = str(error) if error is not None else "the master closed the socket"
            self.emit(events.SessionLost(self.server, reason))
            if not self.config.reconnect:
                raise SessionClosed(self.server, reason)
            await self._reconnect(reason)
            self.reconnects += 1
            # Up again, as a session of our own would say (the master's algorithms are
            # its own business: the mux protocol does not tell them).
            self.emit(
                events.SessionUp(
                    self.server,
                    f"pid {self.pid}",
                    "",
                    "",
                    "",
                    "",
                    cause=events.CAUSE_LOST,
                    outage=asyncio.get_running_loop().time() - lost_at,
                )
            )

    def reconnect_now(self, cause: str, *, keep_open: float = 0.0) -> None:
        """SIGHUP: the master keeps its own connection to the server, so there is no
        session of ours to remake while it answers; when it is gone, ask its socket now
        instead of at the next backoff step."""
        if self._client is None or self._client.closed:
            self._demand.set()
            return
        self.emit(
            events.Notice(
                f"{cause}: the OpenSSH master at {self.path} keeps its own connection; "
                "nothing to reconnect"
            )
        )

    async def _reconnect(self, reason: str) -> None:
        schedule = backoff(cap=self.config.reconnect_cap, random=self.random)
        for attempt, delay in enumerate(schedule, 1):
            if delay > 0:
                self.emit(events.ReconnectScheduled(self.server, delay, attempt, reason))
                self._demand.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._demand.wait(), delay)
                raise_if_cancelling()
            try:
                await self.connect()
            except ConnectFailed as exc:
                raise_if_cancelling()
                reason = exc.message
            else:
                raise_if_cancelling()
                return

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


async def master_upstream(path: str, config: Config, emit: events.Sink) -> MasterUpstream | None:
    """The upstream for the command-line destination when a ControlPath is set: the
    master if one answers; None to log in ourselves (ControlMaster auto/autoask/yes/ask
    and no master, said once; or a ControlPath only from ssh_config, as ssh falls back).
    With the path given on the command line and ControlMaster no (or unset), a missing
    master is an error (exit 255)."""
    upstream = MasterUpstream(path, config, emit)
    try:
        await upstream.connect()
    except ConnectFailed as exc:
        mode = (config.control_master or "no").lower()
        if mode in ("auto", "autoask", "yes", "ask") or not config.control_path_explicit:
            emit(events.Notice(f"{exc.message}; logging in as usual", key="control-master"))
            return None
        raise ConnectFailed(
            exc.message,
            hint="start one with ssh -M -S PATH -N -f HOST, or pass -o ControlMaster=auto "
            "to log in without it",
        ) from exc
    return upstream

"""A probe on a real session (real sshd behind a relay that can hold its bytes): an
answering session is kept; a silent one is dropped and made again at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from fixtures.in_process import EventLog, sshd_config
from fixtures.sshd import SshdServer

from tunnel import events, watch
from tunnel.config import HostKeyPolicy
from tunnel.keeper import Supervisor
from tunnel.session import Session

WAIT = 60.0


class HoldingRelay:
    """127.0.0.1:port -> sshd. hold() freezes every connection open now (bytes are kept,
    not passed on, no FIN, no RST), as a network that went away; new ones pass."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = asyncio.Event()
        self.port = 0
        self._pumps: set[asyncio.Task[None]] = set()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if held.is_set():
                    await asyncio.Event().wait()  # held forever
                writer.write(data)
                await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held = self.frozen
        # Connections made after hold() get a fresh, unset event.
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, held)),
            asyncio.create_task(self._pump(up_reader, writer, held)),
        ]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            writer.close()
            up_writer.close()

    def hold(self) -> None:
        self.frozen.set()
        self.frozen = asyncio.Event()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[HoldingRelay]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for task in self._pumps:
                task.cancel()


async def test_a_silent_session_is_dropped_and_made_again_at_once(sshd: SshdServer) -> None:
    log = EventLog()
    relay = HoldingRelay((sshd.host, sshd.port))
    async with relay.running():
        # The relay's port is not in known_hosts; what is checked here is the probe.
        config = sshd_config(sshd, host_key_policy=HostKeyPolicy.NO)
        config = dataclasses.replace(
            config, destination=dataclasses.replace(config.destination, port=relay.port)
        )
        session = Session(config, log)
        supervisor = Supervisor(session, config, log)
        await supervisor.start()
        keeping = asyncio.create_task(supervisor.keep_up())
        wake = watch.Wake(session, supervisor, log, session.server, probe_timeout=2.0, settle=0)
        waking = asyncio.create_task(wake.run())
        try:
            wake.notice(watch.SLEEP)
            probed = await log.first(events.SessionProbed, WAIT)
            assert probed == events.SessionProbed(session.server, "sleep", True)
            assert not any(isinstance(e, events.SessionLost) for e in log.seen)

            relay.hold()
            wake.notice(watch.NETWORK_CHANGE)
            await log.wait_until(
                lambda: sum(isinstance(e, events.SessionUp) for e in log.seen) == 2, WAIT
            )
            names = [type(e).__name__ for e in log.seen]
            after = names[names.index("SessionProbed") + 1 :]
            assert after[:3] == ["SessionProbed", "SessionLost", "SessionConnecting"]
            second = [e for e in log.seen if isinstance(e, events.SessionProbed)][1]
            assert second == events.SessionProbed(session.server, "network", False)
            [lost] = [e for e in log.seen if isinstance(e, events.SessionLost)]
            assert "network change" in lost.reason
            # Made again at once: no backoff delay was scheduled.
            assert not any(isinstance(e, events.ReconnectScheduled) for e in log.seen)
            assert await session.probe(10.0)
        finally:
            for task in (waking, keeping):
                task.cancel()
            await asyncio.gather(waking, keeping, return_exceptions=True)
            await session.close()

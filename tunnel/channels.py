"""The seam between the proxy and the SSH session.

The proxy asks an :class:`Opener` for a channel and hands it a :class:`ChannelSink` to
report to; the session implements the opener with asyncssh, tests with plain sockets.
Neither side imports the other.
"""

from __future__ import annotations

from typing import Protocol


class ChannelSink(Protocol):
    """What an opened channel reports to: the far side's data, EOF, flow and close."""

    def remote_data(self, data: bytes) -> None: ...
    def remote_eof(self) -> None: ...
    def remote_pause(self) -> None: ...
    def remote_resume(self) -> None: ...
    def remote_closed(self, exc: BaseException | None) -> None: ...


class Channel(Protocol):
    """The near side of an opened channel. It is handed over with reading paused; the
    proxy resumes it once the SOCKS reply is written."""

    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


class Opener(Protocol):
    async def open_tcp(
        self, host: str, port: int, origin: tuple[str, int], sink: ChannelSink
    ) -> Channel:
        """Open a channel to host:port; raise ChannelOpenFailed with the reason if not."""
        ...

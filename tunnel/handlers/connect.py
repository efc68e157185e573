"""SOCKS CONNECT: open a channel through the router, reply only once it is open (or
with the reply that says why not), then hand the channel to the client's relay."""

from __future__ import annotations

from ..errors import ChannelOpenFailed
from ..socks import Request, ServerConnection
from .base import Client, socks_fail


class ConnectHandler:
    def __init__(self, client: Client, codec: ServerConnection, request: Request) -> None:
        self.client = client
        self.codec = codec
        self.request = request

    def start(self) -> None:
        # Stop reading until the channel is open: what was pipelined stays bounded.
        self.client.transport.pause_reading()
        self.client.spawn(self._open())

    async def _open(self) -> None:
        client, codec = self.client, self.codec
        try:
            channel = await client.open_channel(
                self.request.host, self.request.port, client, lend=not codec.trailing_data
            )
        except ChannelOpenFailed as exc:
            socks_fail(client, codec, exc)
            return
        client.transport.write(codec.accept())
        # Channels arrive paused so that nothing can overtake the reply; now it is out.
        client.start_relay(channel, codec.trailing_data)

    def data_received(self, data: bytes) -> None:
        # Pipelined after the request: the codec keeps it as trailing data.
        self.codec.receive_data(data)

    def eof_received(self) -> bool:
        # The whole request (and maybe data) came before EOF: pass it on later.
        return True

    def close(self) -> None:
        """Nothing of its own: the opening task belongs to the client."""

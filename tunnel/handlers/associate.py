"""SOCKS5 UDP ASSOCIATE: start a relay (:class:`tunnel.udp.UdpAssociation`) on the
address the client reached us on and reply with it; the control connection then carries
nothing and its close ends the association."""

from __future__ import annotations

import time

from ..errors import ChannelOpenFailed, ReplyReason
from ..socks import Request, ServerConnection
from ..udp import UdpAssociation, UdpSettings
from .base import Client, socks_fail


class AssociateHandler:
    def __init__(
        self, client: Client, codec: ServerConnection, request: Request, settings: UdpSettings
    ) -> None:
        self.client = client
        self.codec = codec
        self.request = request
        self.settings = settings
        self.association: UdpAssociation | None = None

    def start(self) -> None:
        self.client.spawn(self._associate())

    async def _associate(self) -> None:
        client = self.client
        started = time.monotonic()
        peer = client.transport.get_extra_info("peername") or ("127.0.0.1", 0)
        local = client.transport.get_extra_info("sockname") or ("127.0.0.1", 0)
        association = UdpAssociation(
            self.settings,
            client.info,
            (str(peer[0]), self.request.port),
            user=client.user,
            spawn=client.spawn,
        )
        try:
            client.check_limit()
            host, port = await association.start(str(local[0]))
        except (ChannelOpenFailed, OSError) as exc:
            association.close()
            if isinstance(exc, OSError):
                reason = f"cannot open a UDP relay: {exc.strerror or exc}"
                exc = ChannelOpenFailed(ReplyReason.GENERAL_FAILURE, reason)
            socks_fail(client, self.codec, exc)
            return
        if client.closed:
            association.close()
            return
        self.association = association
        client.info.host, client.info.port = host, port
        client.opened(time.monotonic() - started)
        client.transport.write(self.codec.accept(host, port))

    def data_received(self, data: bytes) -> None:
        if self.association is None:
            # Pipelined after the request: the codec keeps it, as for any command.
            self.codec.receive_data(data)

    def eof_received(self) -> bool:
        # Closing the control connection ends the association; before it is up, the
        # whole request came before EOF and the answer still goes out.
        return self.association is None

    def close(self) -> None:
        association, self.association = self.association, None
        if association is not None:
            association.close()

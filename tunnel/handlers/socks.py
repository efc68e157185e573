"""The SOCKS handshake: feeds the sans-I/O codec (greeting, RFC 1929 login, request)
and hands a complete request to the handler of its command."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import ChannelOpenFailed, RemoteProtocolError, ReplyReason
from ..names import printable, user_name
from ..socks import NEED_DATA, Command, Credentials, Request, ServerConnection, SocksVersion
from .base import Client, Handler, normal_host, socks_fail

# Builds the handler of one command for a request the codec has parsed.
CommandHandler = Callable[[Client, ServerConnection, Request], Handler]


@dataclass(frozen=True, slots=True)
class SocksSettings:
    """What a listener offers SOCKS clients: a handler per command (a command without
    one gets 0x07, "not available ``where``"), and the password check, if any.
    ``any_login`` (``--isolate`` without a password): a SOCKS5 client may log in with
    any name and password, the name kept as its isolation key."""

    commands: Mapping[Command, CommandHandler]
    check_credentials: Callable[[bytes, bytes], bool] | None = None
    where: str = "here"
    any_login: bool = False


def protocol_name(request: Request) -> str:
    """The protocol as events name it."""
    if request.command is Command.BIND:
        return f"socks{request.version}-bind"
    if request.command is Command.UDP_ASSOCIATE:
        return "socks5-udp"
    if request.version is SocksVersion.SOCKS4 and request.sent_name:
        return "socks4a"
    return f"socks{request.version}"


class SocksHandshake:
    def __init__(self, client: Client, settings: SocksSettings) -> None:
        self.client = client
        self.settings = settings
        self.codec = ServerConnection(
            require_auth=settings.check_credentials is not None,
            offer_auth=settings.any_login,
        )
        # A failure answer held back by the login throttle.
        self.held: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Nothing to start: the codec is fed as bytes come."""

    def data_received(self, data: bytes) -> None:
        if self.held is not None:
            return  # a failed login waits for its answer; what it sends meanwhile is moot
        self.codec.receive_data(data)
        self._events()

    def eof_received(self) -> bool:
        if self.held is None:
            self.client.reject_client("client closed its side during the handshake")
        # (Else it gave up waiting for the answer to a wrong password.)
        return False

    def close(self) -> None:
        if self.held is not None:
            self.held.cancel()
            self.held = None

    def _events(self) -> None:
        client, codec = self.client, self.codec
        while True:
            try:
                event = codec.next_event()
            except RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            out = codec.data_to_send()
            if out:
                client.transport.write(out)
            if event is NEED_DATA:
                return
            if isinstance(event, Credentials):
                check = self.settings.check_credentials
                assert check is not None or self.settings.any_login
                if check is not None and not check(event.username, event.password):
                    client.reject_client("wrong proxy credentials (SOCKS5)", auth=True, close=False)
                    self._answer_later(client.login_failed(), codec.reject_auth())
                    return
                client.user = user_name(event.username)
                client.transport.write(codec.accept_auth())
                continue
            assert isinstance(event, Request)
            self._request(event)
            return

    def _request(self, request: Request) -> None:
        client = self.client
        protocol = protocol_name(request)
        try:
            # One form for the rules, the events and the server alike (tunnel.names).
            request = dataclasses.replace(request, host=normal_host(request.host))
        except ChannelOpenFailed as exc:
            # The name stays out of the event as sent: it may hold control characters.
            host = printable(request.host)
            client.parsed(protocol, request.command.name, host, request.port, request.sent_name)
            socks_fail(client, self.codec, exc)
            return
        client.parsed(protocol, request.command.name, request.host, request.port, request.sent_name)
        if request.version is SocksVersion.SOCKS4 and self.settings.check_credentials is not None:
            refusal = ChannelOpenFailed(
                ReplyReason.CONNECTION_NOT_ALLOWED,
                "SOCKS4 has no password and this proxy requires one: use SOCKS5 or HTTP",
            )
            socks_fail(client, self.codec, refusal)
            return
        build = self.settings.commands.get(request.command)
        if build is None:
            message = f"{request.command.name} is not available {self.settings.where}"
            refusal = ChannelOpenFailed(ReplyReason.COMMAND_NOT_SUPPORTED, message)
            socks_fail(client, self.codec, refusal)
            return
        handler = build(client, self.codec, request)
        client.hand_over(handler)
        handler.start()

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        out = self.codec.data_to_send()
        if out:
            self.client.transport.write(out)
        if exc.reply:
            self.client.transport.write(exc.reply)
        self.client.reject_client(exc.message)

    def _answer_later(self, hold: float, answer: bytes) -> None:
        """Send a failure answer and close, after ``hold`` seconds (at once for 0).
        Reading goes on meanwhile, only so that a client that hangs up is seen."""
        if hold <= 0:
            self._send_and_close(answer)
            return
        self.held = asyncio.get_running_loop().call_later(hold, self._send_and_close, answer)

    def _send_and_close(self, answer: bytes) -> None:
        self.held = None
        transport = self.client.transport
        if not transport.is_closing():
            transport.write(answer)
            transport.close()

"""Sans-I/O SOCKS4, SOCKS4a and SOCKS5 server codec (RFC 1928, the SOCKS4 and 4a notes).

The codec never touches a socket and never decides on its own that a request succeeded:

    conn = ServerConnection()
    conn.receive_data(chunk)              # any split of the input gives the same result
    event = conn.next_event()             # NEED_DATA or a Request
    transport.write(conn.data_to_send())  # method selection, when SOCKS5 negotiated one
    ...
    transport.write(conn.accept())        # only once the outbound channel is open
    transport.write(conn.reject(reason))  # or the reply that tells why it failed

BIND has two replies: ``accept()`` once the far side listens (BND = where it listens),
then ``accept()`` again when the expected peer has connected (BND = the peer), or
``reject()`` if it never does. UDP ASSOCIATE's one reply carries the relay's address;
the datagrams themselves use :func:`parse_datagram` and :func:`build_datagram` (RFC 1928
section 7).

A client that breaks the protocol raises :class:`RemoteProtocolError`; its ``reply`` is
what to send before closing (empty where the RFC has no answer, such as a wrong version
byte). Calling the codec out of order raises :class:`LocalProtocolError`.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Final

from .errors import LocalProtocolError, RemoteProtocolError, ReplyReason, socks4_code


class SocksVersion(enum.IntEnum):
    SOCKS4 = 0x04
    SOCKS5 = 0x05


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAINNAME = 0x03
    IPV6 = 0x04


class AuthMethod(enum.IntEnum):
    NO_AUTHENTICATION_REQUIRED = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class State(enum.Enum):
    START = enum.auto()
    SOCKS5_GREETING = enum.auto()
    SOCKS5_AUTH = enum.auto()
    AWAITING_AUTH = enum.auto()
    SOCKS5_REQUEST = enum.auto()
    SOCKS4_REQUEST = enum.auto()
    AWAITING_DECISION = enum.auto()
    AWAITING_PEER = enum.auto()
    ACCEPTED = enum.auto()
    CLOSED = enum.auto()


class _NeedData:
    """Sentinel: the codec needs more bytes before it can say anything."""

    _instance: _NeedData | None = None

    def __new__(cls) -> _NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class Request:
    """A complete client request. ``host`` is a name only when the client sent one
    (SOCKS4a, SOCKS5 DOMAINNAME); for address types it is the address in text form."""

    version: SocksVersion
    command: Command
    address_type: AddressType
    host: str
    port: int
    user_id: bytes = b""

    @property
    def sent_name(self) -> bool:
        return self.address_type is AddressType.DOMAINNAME


@dataclass(frozen=True, slots=True)
class Credentials:
    """RFC 1929 username/password, to be checked with :meth:`ServerConnection.accept_auth`
    or :meth:`ServerConnection.reject_auth`."""

    username: bytes
    password: bytes = field(repr=False)


Event = Request | Credentials | _NeedData

AUTH_VERSION: Final = 0x01

# Limits. SOCKS5 fields carry their own one-byte lengths; SOCKS4's NUL-terminated fields
# do not, so a client that never sends the NUL must not make us buffer without bound.
MAX_USER_ID: Final = 255
MAX_HOST_NAME: Final = 255

_SOCKS4_HEADER: Final = 8
_SOCKS5_REQUEST_HEADER: Final = 4
_COMMANDS: Final = frozenset(Command)


# Replies are built from an address parsed each time; nearly all are the same few.
@functools.lru_cache(maxsize=256)
def socks5_reply(reason: ReplyReason, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT. Zeros are what every common client accepts."""
    address = ipaddress.ip_address(host)
    atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes((SocksVersion.SOCKS5, reason, 0x00, atyp)) + address.packed + port.to_bytes(2)


@functools.lru_cache(maxsize=256)
def socks4_reply(reason: ReplyReason, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """VN(0) CD DSTPORT DSTIP. SOCKS4 has no room for an IPv6 address: zeros then."""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    packed = address.packed if address.version == 4 else bytes(4)
    return bytes((0x00, socks4_code(reason))) + port.to_bytes(2) + packed


_SOCKS5_FAILURE: Final = socks5_reply(ReplyReason.GENERAL_FAILURE)
_SOCKS4_FAILURE: Final = socks4_reply(ReplyReason.GENERAL_FAILURE)


def _decode_host_name(raw: bytes, failure: bytes) -> str:
    if not raw:
        raise RemoteProtocolError("empty host name", reply=failure)
    if b"\x00" in raw:
        raise RemoteProtocolError("NUL byte in host name", reply=failure)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("host name is not valid UTF-8", reply=failure) from None


class ServerConnection:
    """The server side of one SOCKS exchange, from the first byte to the reply."""

    def __init__(self, *, require_auth: bool = False, offer_auth: bool = False) -> None:
        # With require_auth, SOCKS5 clients must use RFC 1929 username/password. With
        # offer_auth (--isolate), a client that offers it logs in (the caller accepts
        # any name, used as an isolation key) and one that offers only no-auth does not.
        self._require_auth = require_auth
        self._offer_auth = offer_auth
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._state = State.START
        self._request: Request | None = None

    @property
    def state(self) -> State:
        return self._state

    def receive_data(self, data: bytes) -> None:
        if self._state is State.CLOSED:
            raise LocalProtocolError("receive_data() after the exchange ended")
        self._buffer += data

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request, to be forwarded once the channel opens."""
        if self._state not in (State.AWAITING_DECISION, State.AWAITING_PEER, State.ACCEPTED):
            raise LocalProtocolError("trailing_data before a complete request")
        return bytes(self._buffer)

    def next_event(self) -> Event:
        try:
            return self._next_event()
        except RemoteProtocolError:
            self._state = State.CLOSED
            self._buffer.clear()
            raise

    def accept(self, host: str = "0.0.0.0", port: int = 0) -> bytes:
        """The success reply. Call it only once the outbound channel is open. For BIND
        the first call says where the far side listens and the second which peer came."""
        request = self._decided()
        first_of_two = request.command is Command.BIND and self._state is State.AWAITING_DECISION
        self._state = State.AWAITING_PEER if first_of_two else State.ACCEPTED
        if request.version is SocksVersion.SOCKS4:
            return socks4_reply(ReplyReason.SUCCEEDED, host, port)
        return socks5_reply(ReplyReason.SUCCEEDED, host, port)

    def reject(self, reason: ReplyReason) -> bytes:
        """The failure reply for ``reason``; the exchange is over, close after sending."""
        if reason is ReplyReason.SUCCEEDED:
            raise LocalProtocolError("reject() needs a failure reason")
        request = self._decided()
        self._state = State.CLOSED
        self._buffer.clear()
        if request.version is SocksVersion.SOCKS4:
            return socks4_reply(reason)
        return socks5_reply(reason)

    def accept_auth(self) -> bytes:
        """RFC 1929 success; the request comes next."""
        self._expect(State.AWAITING_AUTH)
        self._state = State.SOCKS5_REQUEST
        return bytes((AUTH_VERSION, 0x00))

    def reject_auth(self) -> bytes:
        """RFC 1929 failure: the server must close the connection after sending it."""
        self._expect(State.AWAITING_AUTH)
        self._state = State.CLOSED
        self._buffer.clear()
        return bytes((AUTH_VERSION, 0x01))

    def _expect(self, state: State) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"expected state {state.name}, not {self._state.name}")

    def _decided(self) -> Request:
        waiting = (State.AWAITING_DECISION, State.AWAITING_PEER)
        if self._state not in waiting or self._request is None:
            raise LocalProtocolError(f"no request awaits a reply (state {self._state.name})")
        return self._request

    def _next_event(self) -> Event:
        if self._state is State.START:
            if not self._buffer:
                return NEED_DATA
            first = self._buffer[0]
            if first == SocksVersion.SOCKS5:
                self._state = State.SOCKS5_GREETING
            elif first == SocksVersion.SOCKS4:
                self._state = State.SOCKS4_REQUEST
            else:
                # Not SOCKS at all (an HTTP request or TLS hello on the wrong port): no
                # version to answer in, so the only honest answer is to close.
                raise RemoteProtocolError(f"not a SOCKS client (first byte 0x{first:02x})")
        if self._state is State.SOCKS5_GREETING and not self._socks5_greeting():
            return NEED_DATA
        if self._state is State.SOCKS5_AUTH:
            return self._socks5_auth()
        if self._state is State.AWAITING_AUTH:
            raise LocalProtocolError("next_event() before accept_auth() or reject_auth()")
        if self._state is State.SOCKS5_REQUEST:
            return self._socks5_request()
        if self._state is State.SOCKS4_REQUEST:
            return self._socks4_request()
        if self._state is State.CLOSED:
            raise LocalProtocolError("next_event() after the exchange ended")
        return NEED_DATA

    @property
    def buffered(self) -> int:
        """How many bytes wait in the codec (what a client sent before its reply)."""
        return len(self._buffer)

    def _socks5_greeting(self) -> bool:
        buf = self._buffer
        if len(buf) < 2:
            return False
        nmethods = buf[1]
        if len(buf) < 2 + nmethods:
            return False
        methods = bytes(buf[2 : 2 + nmethods])
        del buf[: 2 + nmethods]
        login = self._require_auth or (self._offer_auth and AuthMethod.USERNAME_PASSWORD in methods)
        wanted = AuthMethod.USERNAME_PASSWORD if login else AuthMethod.NO_AUTHENTICATION_REQUIRED
        if wanted not in methods:
            raise RemoteProtocolError(
                "no acceptable authentication method offered",
                reply=bytes((SocksVersion.SOCKS5, AuthMethod.NO_ACCEPTABLE_METHODS)),
            )
        self._outgoing += bytes((SocksVersion.SOCKS5, wanted))
        self._state = State.SOCKS5_AUTH if login else State.SOCKS5_REQUEST
        return True

    def _socks5_auth(self) -> Event:
        """RFC 1929: VER(1) ULEN UNAME PLEN PASSWD."""
        buf = self._buffer
        if not buf:
            return NEED_DATA
        if buf[0] != AUTH_VERSION:
            raise RemoteProtocolError(
                f"username/password version 0x{buf[0]:02x}", reply=bytes((AUTH_VERSION, 0x01))
            )
        if len(buf) < 2:
            return NEED_DATA
        user_end = 2 + buf[1]
        if len(buf) < user_end + 1:
            return NEED_DATA
        pass_end = user_end + 1 + buf[user_end]
        if len(buf) < pass_end:
            return NEED_DATA
        credentials = Credentials(bytes(buf[2:user_end]), bytes(buf[user_end + 1 : pass_end]))
        del buf[:pass_end]
        self._state = State.AWAITING_AUTH
        return credentials

    def _socks5_request(self) -> Event:
        buf = self._buffer
        if len(buf) < _SOCKS5_REQUEST_HEADER:
            return NEED_DATA
        version, command, reserved, atyp = buf[0], buf[1], buf[2], buf[3]
        if version != SocksVersion.SOCKS5:
            raise RemoteProtocolError(
                f"request version 0x{version:02x} after a SOCKS5 greeting", reply=_SOCKS5_FAILURE
            )
        if command not in _COMMANDS:
            raise RemoteProtocolError(
                f"unknown command 0x{command:02x}",
                reply=socks5_reply(ReplyReason.COMMAND_NOT_SUPPORTED),
            )
        if reserved != 0:
            raise RemoteProtocolError("reserved byte is not zero", reply=_SOCKS5_FAILURE)
        if atyp == AddressType.IPV4:
            end = _SOCKS5_REQUEST_HEADER + 4
            if len(buf) < end + 2:
                return NEED_DATA
            host = str(ipaddress.IPv4Address(bytes(buf[4:end])))
        elif atyp == AddressType.IPV6:
            end = _SOCKS5_REQUEST_HEADER + 16
            if len(buf) < end + 2:
                return NEED_DATA
            host = str(ipaddress.IPv6Address(bytes(buf[4:end])))
        elif atyp == AddressType.DOMAINNAME:
            if len(buf) < _SOCKS5_REQUEST_HEADER + 1:
                return NEED_DATA
            end = _SOCKS5_REQUEST_HEADER + 1 + buf[4]
            if len(buf) < end + 2:
                return NEED_DATA
            host = _decode_host_name(bytes(buf[5:end]), _SOCKS5_FAILURE)
        else:
            raise RemoteProtocolError(
                f"unknown address type 0x{atyp:02x}",
                reply=socks5_reply(ReplyReason.ADDRESS_TYPE_NOT_SUPPORTED),
            )
        port = int.from_bytes(buf[end : end + 2])
        del buf[: end + 2]
        return self._complete(
            Request(SocksVersion.SOCKS5, Command(command), AddressType(atyp), host, port)
        )

    def _socks4_request(self) -> Event:
        buf = self._buffer
        if len(buf) < _SOCKS4_HEADER:
            return NEED_DATA
        command = buf[1]
        if command not in (Command.CONNECT, Command.BIND):
            raise RemoteProtocolError(
                f"unknown SOCKS4 command 0x{command:02x}", reply=_SOCKS4_FAILURE
            )
        user_end = self._find_nul(_SOCKS4_HEADER, MAX_USER_ID, "user id")
        if user_end < 0:
            return NEED_DATA
        port = int.from_bytes(buf[2:4])
        address = ipaddress.IPv4Address(bytes(buf[4:8]))
        user_id = bytes(buf[_SOCKS4_HEADER:user_end])
        # SOCKS4a: 0.0.0.x with x != 0 means "the host name follows the user id".
        if buf[4:7] == b"\x00\x00\x00" and buf[7] != 0:
            host_end = self._find_nul(user_end + 1, MAX_HOST_NAME, "host name")
            if host_end < 0:
                return NEED_DATA
            host = _decode_host_name(bytes(buf[user_end + 1 : host_end]), _SOCKS4_FAILURE)
            del buf[: host_end + 1]
            atyp = AddressType.DOMAINNAME
        else:
            del buf[: user_end + 1]
            host = str(address)
            atyp = AddressType.IPV4
        return self._complete(
            Request(SocksVersion.SOCKS4, Command(command), atyp, host, port, user_id)
        )

    def _find_nul(self, start: int, limit: int, what: str) -> int:
        """Index of the NUL ending a field that starts at ``start``, -1 if not here yet."""
        end = self._buffer.find(b"\x00", start, start + limit + 1)
        if end < 0 and len(self._buffer) > start + limit:
            raise RemoteProtocolError(
                f"SOCKS4 {what} longer than {limit} bytes", reply=_SOCKS4_FAILURE
            )
        return end

    def _complete(self, request: Request) -> Request:
        self._request = request
        self._state = State.AWAITING_DECISION
        return request


# -- UDP (RFC 1928 section 7) ------------------------------------------------------

# RSV(2) FRAG(1) ATYP(1): what precedes DST.ADDR in every datagram.
_UDP_HEADER: Final = 4


@dataclass(frozen=True, slots=True)
class Datagram:
    """One UDP request or reply: where it goes (or came from) and its data. ``frag`` is
    kept so that the relay can count the fragments it drops (it reassembles none)."""

    address_type: AddressType
    host: str
    port: int
    payload: bytes
    frag: int = 0


def encode_address(host: str, port: int) -> bytes:
    """ATYP DST.ADDR DST.PORT: an IP literal as itself, anything else as a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("utf-8")
        if not 0 < len(name) <= MAX_HOST_NAME:
            raise ValueError(f"host name of {len(name)} bytes cannot be sent") from None
        return bytes((AddressType.DOMAINNAME, len(name))) + name + port.to_bytes(2)
    atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes((atyp,)) + address.packed + port.to_bytes(2)


def decode_address(data: bytes, offset: int = 0) -> tuple[AddressType, str, int, int]:
    """The ATYP DST.ADDR DST.PORT at ``offset`` of a whole message: (type, host, port,
    offset after it). A short or unknown one raises :class:`RemoteProtocolError`."""
    if len(data) <= offset:
        raise RemoteProtocolError("no address")
    atyp = data[offset]
    start = offset + 1
    if atyp == AddressType.IPV4:
        end = start + 4
        host = str(ipaddress.IPv4Address(data[start:end])) if len(data) >= end else ""
    elif atyp == AddressType.IPV6:
        end = start + 16
        host = str(ipaddress.IPv6Address(data[start:end])) if len(data) >= end else ""
    elif atyp == AddressType.DOMAINNAME:
        if len(data) <= start:
            raise RemoteProtocolError("address cut short")
        end = start + 1 + data[start]
        host = "" if len(data) < end else _decode_host_name(data[start + 1 : end], b"")
    else:
        raise RemoteProtocolError(f"unknown address type 0x{atyp:02x}")
    if len(data) < end + 2:
        raise RemoteProtocolError("address cut short")
    return AddressType(atyp), host, int.from_bytes(data[end : end + 2]), end + 2


def parse_datagram(data: bytes) -> Datagram:
    """A datagram a client sent to the relay. Malformed ones raise
    :class:`RemoteProtocolError`; UDP has no reply, the relay drops them."""
    if len(data) < _UDP_HEADER:
        raise RemoteProtocolError("datagram shorter than its header")
    if data[0] or data[1]:
        raise RemoteProtocolError("reserved bytes of a datagram are not zero")
    atyp, host, port, end = decode_address(data, 3)
    return Datagram(atyp, host, port, data[end:], frag=data[2])


def build_datagram(host: str, port: int, payload: bytes) -> bytes:
    """A datagram for the client: RSV FRAG(0) and where the payload came from."""
    return b"\x00\x00\x00" + encode_address(host, port) + payload

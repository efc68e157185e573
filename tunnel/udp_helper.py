"""The UDP helper: runs on the SSH server (``--udp-helper``), never imported by pytunnel.

pytunnel sends this file's text over an exec channel as ``python3 -c ...``, so nothing is
installed on the server. It relays datagrams between its stdin/stdout and UDP sockets:

    stdin:  LENGTH(4) ATYP DST.ADDR DST.PORT PAYLOAD   a datagram to send
    stdout: LENGTH(4) ATYP SRC.ADDR SRC.PORT PAYLOAD   a datagram that came back

Addresses are encoded as in RFC 1928 (1 = IPv4, 3 = name, 4 = IPv6); names are resolved
here, on the server. The first thing written is a hello line, so that pytunnel can tell
a running helper from a shell's "command not found". It exits when stdin closes.

Standard library only, and kept to Python 3.6 syntax: servers run old Pythons.
"""

import contextlib
import os
import select
import socket
import sys

HELLO = b"PYTUNNEL-UDP 1\n"
MAX_FRAME = 65507 + 1 + 1 + 255 + 2
IPV4, NAME, IPV6 = 1, 3, 4


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def encode(host: str, port: int, payload: bytes) -> bytes:
    if ":" in host:
        address = bytes([IPV6]) + socket.inet_pton(socket.AF_INET6, host.split("%")[0])
    else:
        address = bytes([IPV4]) + socket.inet_aton(host)
    body = address + port.to_bytes(2, "big") + payload
    return len(body).to_bytes(4, "big") + body


def decode(frame: bytes) -> "tuple[str, int, bytes] | None":
    if not frame:
        return None
    kind = frame[0]
    if kind == IPV4 and len(frame) >= 7:
        host, rest = socket.inet_ntop(socket.AF_INET, frame[1:5]), frame[5:]
    elif kind == IPV6 and len(frame) >= 19:
        host, rest = socket.inet_ntop(socket.AF_INET6, frame[1:17]), frame[17:]
    elif kind == NAME and len(frame) >= 2 and len(frame) >= 4 + frame[1]:
        host, rest = frame[2 : 2 + frame[1]].decode("utf-8", "replace"), frame[2 + frame[1] :]
    else:
        return None
    return host, int.from_bytes(rest[:2], "big"), rest[2:]


class Relay:
    def __init__(self) -> None:
        self.sockets = {}  # type: dict[int, socket.socket]
        self.resolved = {}  # type: dict[tuple[str, int], tuple[int, tuple[object, ...]]]

    def socket_for(self, family: int) -> socket.socket:
        sock = self.sockets.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self.sockets[family] = sock
        return sock

    def send(self, host: str, port: int, payload: bytes) -> None:
        key = (host, port)
        target = self.resolved.get(key)
        if target is None:
            try:
                info = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
            except (OSError, UnicodeError):
                return  # UDP: an unresolvable name is a lost datagram
            target = (info[0], info[4])
            if len(self.resolved) < 1024:
                self.resolved[key] = target
        # Unreachable, refused, too big: UDP gives no answer either.
        with contextlib.suppress(OSError):
            self.socket_for(target[0]).sendto(payload, target[1])

    def receive(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                payload, source = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error reported on the socket: nothing to relay
            write_all(1, encode(source[0], source[1], payload))


def main() -> int:
    relay = Relay()
    stdin = sys.stdin.fileno()
    buffer = b""
    write_all(1, HELLO)
    while True:
        readable = select.select([stdin, *relay.sockets.values()], [], [])[0]
        for sock in relay.sockets.values():
            if sock in readable:
                relay.receive(sock)
        if stdin in readable:
            data = os.read(stdin, 262144)
            if not data:
                return 0
            buffer += data
            while len(buffer) >= 4:
                size = int.from_bytes(buffer[:4], "big")
                if size > MAX_FRAME:
                    return 2
                if len(buffer) < 4 + size:
                    break
                frame, buffer = buffer[4 : 4 + size], buffer[4 + size :]
                parsed = decode(frame)
                if parsed is not None:
                    relay.send(*parsed)


if __name__ == "__main__":
    sys.exit(main())

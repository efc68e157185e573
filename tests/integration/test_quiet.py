"""``-q`` against the real console script: a client that connects and closes without a
byte (a port probe, a browser's spare preconnect) is counted, never reported as a
problem; a client that sends garbage still is."""

from __future__ import annotations

import socket

from fixtures.asyncssh_server import AsyncsshServer
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    client_name,
    closed_by_peer,
    connect_proxy,
    server_args,
)


def test_quiet_keeps_a_bare_connect_and_close_to_itself(
    pytunnel_factory: PytunnelFactory, asyncssh_server: AsyncsshServer
) -> None:
    tunnel = pytunnel_factory(["-q", "-D", "127.0.0.1:0", *server_args(asyncssh_server)])
    with connect_proxy(tunnel.address) as probe:
        probe_name = client_name(probe)
        probe.shutdown(socket.SHUT_WR)
        assert closed_by_peer(probe) == b""
    left = tunnel.wait_event("client_rejected", client=probe_name)
    assert left["empty"] is True
    assert "host" not in left
    # A client that broke the protocol is still a problem: its line is the fence that
    # shows every line before it has been written.
    with connect_proxy(tunnel.address) as garbage:
        garbage_name = client_name(garbage)
        garbage.sendall(b"\x8f\x00\x01")
        closed_by_peer(garbage)
    rejected = tunnel.wait_event("client_rejected", client=garbage_name)
    assert rejected["empty"] is False
    assert tunnel.wait_stderr(f"{garbage_name} rejected"), tunnel.describe()
    assert probe_name not in tunnel.stderr_text(), tunnel.describe()

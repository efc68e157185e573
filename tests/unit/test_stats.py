"""The pure fold of events into counters (tunnel/stats.py). Time is always explicit."""

from __future__ import annotations

import pytest

from tunnel import events
from tunnel.stats import Failure, Stats, is_public_address


def conn(
    id: int, host: str = "192.0.2.10", port: int = 443, *, version: int = 5
) -> events.ConnectionInfo:
    return events.ConnectionInfo(
        id=id, client=f"127.0.0.1:{40000 + id}", started=100.0, protocol=f"socks{version}",
        host=host, port=port,
    )  # fmt: skip


def fold(stats: Stats, items: list[tuple[float, events.Event]]) -> Stats:
    for now, event in items:
        stats.apply(event, now)
    return stats


def parsed(info: events.ConnectionInfo, host: str, *, sent_name: bool) -> events.RequestParsed:
    return events.RequestParsed(info, "socks5", "CONNECT", host, 443, sent_name)


def failed(info: events.ConnectionInfo, reply: int = 5) -> events.ChannelFailed:
    return events.ChannelFailed(info, reply, "connection refused", "Connection refused")


def closed(info: events.ConnectionInfo, up: int, down: int) -> events.ConnectionClosed:
    return events.ConnectionClosed(info, up, down, 1.0)


def test_fresh_stats() -> None:
    stats = Stats()
    assert (stats.served, stats.failed, stats.rejected) == (0, 0, 0)
    assert (stats.bytes_up, stats.bytes_down) == (0, 0)
    assert stats.session_state == "starting"
    assert stats.open == {}
    assert list(stats.failures) == []


def test_served_failed_rejected_and_open() -> None:
    a, b, c, d = conn(1), conn(2), conn(3), conn(4)
    stats = fold(
        Stats(),
        [
            (1.0, events.ClientAccepted(a)),
            (1.0, events.ChannelOpened(a, 0.05)),
            (2.0, events.ClientAccepted(b)),
            (2.0, failed(b)),
            (3.0, events.ClientRejected(c, "not a SOCKS client")),
            (4.0, events.ChannelOpened(d, 0.01)),
        ],
    )
    assert (stats.served, stats.failed, stats.rejected) == (2, 1, 1)
    assert stats.open == {1: a, 4: d}
    stats.apply(closed(a, 10, 20), 5.0)
    assert stats.open == {4: d}
    assert stats.served == 2, "closing a connection does not change how many were served"


def test_closing_an_unknown_connection_still_counts_its_bytes() -> None:
    # A failed channel is never "open", but its client may have sent bytes.
    stats = fold(Stats(), [(1.0, failed(conn(1))), (1.5, closed(conn(1), 7, 0))])
    assert stats.open == {}
    assert (stats.bytes_up, stats.bytes_down) == (7, 0)


def test_bytes_sum_closed_and_live_connections() -> None:
    a, b = conn(1), conn(2)
    stats = fold(
        Stats(), [(1.0, events.ChannelOpened(a, 0.0)), (1.0, events.ChannelOpened(b, 0.0))]
    )
    assert (stats.bytes_up, stats.bytes_down) == (0, 0)

    a.bytes_up, a.bytes_down = 100, 1000  # the relay adds to the live info
    b.bytes_up = 5
    assert (stats.bytes_up, stats.bytes_down) == (105, 1000)

    stats.apply(closed(a, 120, 1500), 2.0)  # final counts come with the event
    assert (stats.closed_bytes_up, stats.closed_bytes_down) == (120, 1500)
    assert (stats.bytes_up, stats.bytes_down) == (125, 1500)

    a.bytes_up = 10**6  # a closed connection's info no longer counts
    b.bytes_down = 7
    assert (stats.bytes_up, stats.bytes_down) == (125, 1507)


def test_sample_computes_rate_between_samples() -> None:
    a = conn(1)
    stats = fold(Stats(), [(0.0, events.ChannelOpened(a, 0.0))])
    assert stats.sample(10.0) == 0.0, "the first sample has nothing to compare with"

    a.bytes_up, a.bytes_down = 300, 700
    assert stats.sample(12.0) == pytest.approx(500.0)  # 1000 bytes in 2 s
    assert stats.rate == pytest.approx(500.0)

    a.bytes_down += 250
    assert stats.sample(12.5) == pytest.approx(500.0)  # 250 bytes in 0.5 s

    assert stats.sample(13.5) == pytest.approx(0.0)  # idle second

    stats.apply(closed(a, 300, 950), 13.6)  # closing moves bytes, it does not add any
    assert stats.sample(14.5) == pytest.approx(0.0)


def test_sample_at_the_same_time_keeps_the_previous_rate() -> None:
    a = conn(1)
    stats = fold(Stats(), [(0.0, events.ChannelOpened(a, 0.0))])
    stats.sample(1.0)
    a.bytes_up = 100
    assert stats.sample(2.0) == pytest.approx(100.0)
    assert stats.sample(2.0) == pytest.approx(100.0)  # no division by zero


def test_failures_keep_the_last_five() -> None:
    stats = Stats()
    for i in range(1, 8):
        stats.apply(
            events.ChannelFailed(conn(i, "2001:db8::1" if i == 7 else f"10.0.0.{i}", 80), 4,
                                 "host unreachable", f"reason {i}"),
            float(i),
        )  # fmt: skip
    assert stats.failed == 7
    assert [failure.reason for failure in stats.failures] == [f"reason {i}" for i in range(3, 8)]
    assert stats.failures[0] == Failure("10.0.0.3:80", 4, "host unreachable", "reason 3")
    assert stats.failures[-1].destination == "[2001:db8::1]:80"


@pytest.mark.parametrize(
    ("host", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2606:4700:4700::1111", True),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.1.1", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fd00::1", False),
        ("fe80::1", False),
        ("192.0.2.1", False),
        ("example.com", False),
        ("localhost", False),
        ("", False),
    ],
)
def test_is_public_address(host: str, public: bool) -> None:
    assert is_public_address(host) is public


def test_local_dns_requests_count_public_addresses_the_client_resolved() -> None:
    stats = Stats()
    hosts = ["8.8.8.8", "10.0.0.1", "192.168.0.1", "127.0.0.1", "::1", "fd00::1", "2606:4700::1"]
    for i, host in enumerate(hosts):
        stats.apply(parsed(conn(i), host, sent_name=False), float(i))
    # A name sent by the client (socks5h, SOCKS4a) is resolved remotely: never counted,
    # even when the "name" is an address literal.
    stats.apply(parsed(conn(10), "example.com", sent_name=True), 10.0)
    stats.apply(parsed(conn(11), "8.8.4.4", sent_name=True), 11.0)
    assert stats.local_dns_requests == 2


def test_session_state_transitions() -> None:
    stats = Stats()
    stats.apply(events.SessionConnecting("host:22", 1), 1.0)
    assert (stats.session_state, stats.session_since) == ("connecting", None)

    stats.apply(events.SessionUp("host:22", "OpenSSH_9.6", "aes128-gcm", "curve25519",
                                 "hmac-sha2-256", "none"), 2.0)  # fmt: skip
    assert (stats.session_state, stats.session_since) == ("up", 2.0)
    assert (stats.cipher, stats.server_version) == ("aes128-gcm", "OpenSSH_9.6")

    stats.apply(events.SessionLost("host:22", "connection reset"), 50.0)
    assert (stats.session_state, stats.session_since) == ("lost", 50.0)

    stats.apply(events.ReconnectScheduled("host:22", 2.5, 2, "connection reset"), 50.5)
    assert stats.session_state == "waiting"
    assert stats.reconnect_at == pytest.approx(53.0)

    stats.apply(events.SessionConnecting("host:22", 2), 53.0)
    assert stats.session_state == "connecting"
    assert stats.reconnect_at is None

    stats.apply(events.SessionUp("host:22", "OpenSSH_9.7", "chacha20-poly1305", "k", "m", "c"),
                54.0)  # fmt: skip
    assert (stats.session_state, stats.session_since) == ("up", 54.0)
    assert (stats.cipher, stats.server_version) == ("chacha20-poly1305", "OpenSSH_9.7")

    stats.apply(events.Stopping("interrupted"), 60.0)
    assert stats.session_state == "stopping"


def test_listeners_are_collected_in_order() -> None:
    first, second = events.Listener("127.0.0.1", 1080), events.Listener("::1", 1080)
    stats = fold(
        Stats(),
        [(0.0, events.ListenerStarted(first)), (0.0, events.ListenerStarted(second))],
    )
    assert stats.listeners == [first, second]


def test_a_listener_announced_again_is_listed_once() -> None:
    # -R listeners are opened (and announced) again after every reconnect.
    remote = events.Listener("127.0.0.1", 1080, remote=True)
    local = events.Listener("127.0.0.1", 1080)
    stats = fold(
        Stats(),
        [(0.0, events.ListenerStarted(remote)), (0.0, events.ListenerStarted(local)),
         (9.0, events.ListenerStarted(remote))],
    )  # fmt: skip
    assert stats.listeners == [remote, local]


def test_dropped_datagrams_are_totalled_open_and_closed() -> None:
    stats = Stats()
    first, second = conn(1), conn(2)
    first.dropped, second.dropped = 3, 4
    stats.apply(events.ChannelOpened(first, 0.0), 1.0)
    stats.apply(events.ChannelOpened(second, 0.0), 1.0)
    assert stats.datagrams_dropped == 7
    stats.apply(events.ConnectionClosed(first, 0, 0, 1.0), 2.0)
    second.dropped += 1
    assert stats.datagrams_dropped == 8


def test_events_without_counters_change_nothing() -> None:
    stats = Stats()
    stats.apply(events.SessionUp("host", "OpenSSH_9", "c", "k", "m", "none"), 0.5)
    before = repr(stats)
    stats.apply(events.Notice("use socks5h://"), 1.0)
    stats.apply(events.ClientAccepted(conn(1)), 1.0)
    stats.apply(events.Ready((events.Listener("127.0.0.1", 1080),), "host"), 1.0)
    assert repr(stats) == before


def test_ready_without_a_session_of_ours_is_up() -> None:
    # Riding an OpenSSH master, ready is the first word that the way out is up.
    stats = Stats()
    stats.apply(events.Ready((), "OpenSSH master /s (pid 7)", transport="openssh-master"), 2.0)
    assert (stats.session_state, stats.session_since) == ("up", 2.0)

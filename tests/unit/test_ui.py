"""Renderers: describe(), plain timestamped lines, JSON lines, and the human formats."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from collections.abc import Callable, Iterator

import pytest

from tunnel import events, ui
from tunnel.ui import (
    JsonRenderer,
    PlainRenderer,
    Tee,
    describe,
    event_record,
    human_bytes,
    human_seconds,
)

FIXED_TIME = 1_700_000_000.25  # 2023-11-14T22:13:20.25Z


@pytest.fixture
def utc() -> Iterator[None]:
    """Pin local time to UTC so timestamps are predictable; restore the zone afterwards."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


def info(id: int = 7, host: str = "example.com", port: int = 443) -> events.ConnectionInfo:
    return events.ConnectionInfo(
        id=id, client="127.0.0.1:50000", started=1.0, listener="127.0.0.1:1080", protocol="socks5",
        host=host, port=port,
    )  # fmt: skip


def udp_info() -> events.ConnectionInfo:
    association = info(id=9, host="127.0.0.1", port=40000)
    association.protocol, association.dropped = "socks5-udp", 3
    return association


LISTENER4 = events.Listener("127.0.0.1", 1080)
LISTENER6 = events.Listener("::1", 1080)
SESSION_UP = events.SessionUp(
    "user@host:22", "OpenSSH_9.6p1", "aes256-gcm@openssh.com", "curve25519-sha256",
    "hmac-sha2-256-etm@openssh.com", "none",
)  # fmt: skip
READY = events.Ready((LISTENER4, LISTENER6), "user@host:22")


# ---- describe() ----

DESCRIBE: list[tuple[str, events.Event, list[str], bool]] = [
    # (id, event, substrings, is a problem)
    ("listener-started", events.ListenerStarted(LISTENER4),
     ["listening on", "socks5h://127.0.0.1:1080"], False),
    ("listener-started-v6", events.ListenerStarted(LISTENER6), ["socks5h://[::1]:1080"], False),
    ("ready", READY, ["ready", "socks5h://127.0.0.1:1080", "socks5h://[::1]:1080"], False),
    ("connecting-first", events.SessionConnecting("user@host:22", 1),
     ["connecting to user@host:22"], False),
    ("connecting-again", events.SessionConnecting("user@host:22", 3), ["(attempt 3)"], False),
    ("session-up", SESSION_UP,
     ["connected to user@host:22", "OpenSSH_9.6p1", "aes256-gcm@openssh.com"], False),
    ("session-lost", events.SessionLost("user@host:22", "Connection reset by peer"),
     ["lost user@host:22", "Connection reset by peer"], True),
    ("reconnect", events.ReconnectScheduled("user@host:22", 2.5, 4, "Connection refused"),
     ["reconnecting in 2.5 s", "attempt 4", "Connection refused"], True),
    ("session-replaced", events.SessionLost("user@host:22", "reconnecting now (sighup)",
                                            events.CAUSE_SIGHUP),
     ["reconnecting to user@host:22 now: SIGHUP"], False),
    ("session-back", dataclasses.replace(SESSION_UP, cause=events.CAUSE_SLEEP, outage=3.25),
     ["connected to user@host:22", "back after 3.2", "(resumed from sleep)"], False),
    ("status", events.Status("user@host:22", "up", 125.0, 3600.0, 2, 3, 40, 1, 0, 2048,
                             3 * 1024 * 1024),
     ["status: user@host:22 up for 2m05s", "3 open", "40 served", "1 failed", "0 rejected",
      "2.0 KiB up", "3.0 MiB down", "2 reconnects", "running 1h"], False),
    ("client-rejected", events.ClientRejected(info(), "not a SOCKS client (first byte 0x47)"),
     ["#7", "127.0.0.1:50000", "rejected", "first byte 0x47"], True),
    # A port probe or a spare preconnect: it sent nothing and left. Not a problem.
    ("client-left-empty", events.ClientRejected(
        events.ConnectionInfo(id=8, client="127.0.0.1:50001", started=1.0),
        "client closed without sending a request", empty=True),
     ["#8", "127.0.0.1:50001", "closed without sending a request"], False),
    ("channel-opened", events.ChannelOpened(info(), 0.0421),
     ["#7", "127.0.0.1:50000", "example.com:443", "SOCKS5", "42 ms"], False),
    ("channel-failed", events.ChannelFailed(info(host="2001:db8::1", port=80), 5,
                                            "connection refused", "Connection refused"),
     ["#7", "[2001:db8::1]:80", "connection refused (0x05)", "Connection refused"], True),
    ("connection-closed", events.ConnectionClosed(info(), 2048, 3 * 1024 * 1024, 125.0),
     ["#7", "example.com:443", "2.0 KiB up", "3.0 MiB down", "2m05s"], False),
    ("stopping", events.Stopping("interrupted"), ["stopping: interrupted"], False),
    ("notice", events.Notice("clients resolve names locally; use socks5h://", "dns"),
     ["use socks5h://"], True),
    ("remote-listener", events.ListenerStarted(events.Listener("127.0.0.1", 1080, remote=True)),
     ["listening on socks5h://127.0.0.1:1080 (on the server)"], False),
    ("ready-remote", events.Ready((LISTENER4, events.Listener("::1", 2080, remote=True)), "h"),
     ["socks5h://127.0.0.1:1080 socks5h://[::1]:2080 (on the server)"], False),
    ("datagrams-dropped", events.DatagramsDropped(info(), "not DNS: needs --udp-helper",
                                                  "192.0.2.1:123"),
     ["#7", "UDP datagram to 192.0.2.1:123 dropped", "--udp-helper"], True),
    ("udp-closed", events.ConnectionClosed(udp_info(), 10, 20, 1.0),
     ["#9", "3 datagrams dropped"], False),
    ("bind-opened", events.ChannelOpened(info(host="127.0.0.2", port=21), 0.5),
     ["#7", "127.0.0.2:21"], False),
    ("incoming-refused", events.IncomingRefused("127.0.0.1", 2080, "127.0.0.1:50000",
                                                "no such listener"),
     ["127.0.0.1:50000 -> 127.0.0.1:2080 (on the server) refused: no such listener"], True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("event", "substrings", "problem"),
    [row[1:] for row in DESCRIBE],
    ids=[row[0] for row in DESCRIBE],
)
def test_describe(event: events.Event, substrings: list[str], problem: bool) -> None:
    described = describe(event)
    assert described is not None
    text, is_problem = described
    for substring in substrings:
        assert substring in text, f"{substring!r} not in {text!r}"
    assert "\n" not in text
    assert is_problem is problem


@pytest.mark.parametrize(
    ("listen_host", "client", "shown"),
    [("::1", "[::1]:5", "[::1]:5 -> [::1]:2080"), ("", "192.0.2.7:5", "192.0.2.7:5 -> *:2080")],
    ids=["ipv6", "every-interface"],
)
def test_describe_refused_incoming_names_the_listener(
    listen_host: str, client: str, shown: str
) -> None:
    described = describe(events.IncomingRefused(listen_host, 2080, client, "why"))
    assert described == (f"{shown} (on the server) refused: why", True)


def test_describe_first_attempt_does_not_mention_attempts() -> None:
    described = describe(events.SessionConnecting("host", 1))
    assert described is not None
    assert "attempt" not in described[0]


@pytest.mark.parametrize(
    "event",
    [
        events.ClientAccepted(info()),
        events.RequestParsed(info(), "socks5", "CONNECT", "example.com", 443, True),
    ],
    ids=["client-accepted", "request-parsed"],
)
def test_describe_json_only_events(event: events.Event) -> None:
    assert describe(event) is None


def test_what_the_plain_renderer_skips_without_describing_agrees_with_describe() -> None:
    # PlainRenderer does not describe these kinds: no line at all, or never a problem.
    skipped = [row[1] for row in DESCRIBE if isinstance(row[1], ui._NEVER_A_PROBLEM)]
    assert {type(event) for event in skipped} == set(ui._NEVER_A_PROBLEM)
    for event in skipped:
        described = describe(event)
        assert described is not None
        assert described[1] is False
    assert all(
        describe(kind(info(), *args)) is None  # type: ignore[call-arg]
        for kind, args in zip(
            ui._NO_LINE, [(), ("socks5", "CONNECT", "example.com", 443, True)], strict=True
        )
    )


# ---- PlainRenderer ----


def test_plain_renderer_stamps_lines_with_local_time(utc: None) -> None:
    stream = io.StringIO()
    render = PlainRenderer(stream, clock=lambda: FIXED_TIME)
    render(events.ListenerStarted(LISTENER4))
    render(events.SessionLost("host", "EOF"))
    assert stream.getvalue().splitlines() == [
        "2023-11-14T22:13:20 listening on socks5h://127.0.0.1:1080",
        "2023-11-14T22:13:20 lost host: EOF",
    ]


def test_plain_renderer_reads_the_clock_per_line(utc: None) -> None:
    times = iter([0.0, 61.0])
    stream = io.StringIO()
    render = PlainRenderer(stream, clock=lambda: next(times))
    render(events.Stopping("a"))
    render(events.Stopping("b"))
    stamps = [line.split(" ", 1)[0] for line in stream.getvalue().splitlines()]
    assert stamps == ["1970-01-01T00:00:00", "1970-01-01T00:01:01"]


def test_plain_renderer_skips_json_only_events() -> None:
    stream = io.StringIO()
    render = PlainRenderer(stream, clock=lambda: FIXED_TIME)
    render(events.ClientAccepted(info()))
    render(events.RequestParsed(info(), "socks5", "CONNECT", "example.com", 443, True))
    assert stream.getvalue() == ""


def test_plain_renderer_quiet_keeps_only_problems(utc: None) -> None:
    stream = io.StringIO()
    render = PlainRenderer(stream, quiet=True, clock=lambda: FIXED_TIME)
    for _, event, _, _ in DESCRIBE:
        render(event)
    lines = stream.getvalue().splitlines()
    problems = [row[0] for row in DESCRIBE if row[3]]
    assert problems == [
        "session-lost",
        "reconnect",
        "client-rejected",
        "channel-failed",
        "notice",
        "datagrams-dropped",
        "incoming-refused",
    ]
    # And SIGUSR1's status line, which was asked for.
    assert [line.split(" ", 2)[1] for line in lines] == [
        "lost",
        "reconnecting",
        "status:",
        "#7",
        "#7",
        "clients",
        "#7",
        "127.0.0.1:50000",
    ]
    assert lines[4].endswith("failed: connection refused (0x05): Connection refused")
    assert all(line.startswith("2023-11-14T22:13:20 ") for line in lines)


@pytest.mark.parametrize("quiet", [False, True], ids=["normal", "quiet"])
def test_plain_renderer_gives_the_dns_hint_once(utc: None, quiet: bool) -> None:
    stream = io.StringIO()
    render = PlainRenderer(stream, quiet=quiet, clock=lambda: FIXED_TIME)
    render(events.RequestParsed(info(1), "socks5", "CONNECT", "example.com", 443, True))
    render(events.RequestParsed(info(2), "socks5", "CONNECT", "10.0.0.1", 443, False))
    render(events.RequestParsed(info(3), "socks4a", "CONNECT", "8.8.4.4", 443, True))  # 4a name
    assert stream.getvalue() == "", "names, private addresses and 4a names are not leaks"
    render(events.RequestParsed(info(4), "socks5", "CONNECT", "93.184.216.34", 443, False))
    render(events.RequestParsed(info(5), "socks5", "CONNECT", "2606:4700::1", 443, False))
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("2023-11-14T22:13:20 hint: ")
    assert "socks5h://" in line


# ---- JSON lines ----


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_renderer_prints_nothing_before_ready() -> None:
    stream = io.StringIO()
    render = JsonRenderer(stream, clock=lambda: FIXED_TIME)
    render(events.ListenerStarted(LISTENER4))
    render(events.ListenerStarted(LISTENER6))
    render(events.SessionConnecting("user@host:22", 1))
    render(SESSION_UP)
    render(events.Notice("early notice"))
    assert stream.getvalue() == ""


def test_json_renderer_first_line_is_ready_with_session_folded_in() -> None:
    stream = io.StringIO()
    render = JsonRenderer(stream, clock=lambda: FIXED_TIME)
    render(events.ListenerStarted(LISTENER4))
    render(SESSION_UP)
    render(READY)
    first = stream.getvalue().splitlines()[0]
    record = json.loads(first)
    assert list(record)[:2] == ["event", "time"]
    assert record == {
        "event": "ready",
        "time": FIXED_TIME,
        "listeners": [
            {"host": "127.0.0.1", "port": 1080, "url": "socks5h://127.0.0.1:1080", "remote": False},
            {"host": "::1", "port": 1080, "url": "socks5h://[::1]:1080", "remote": False},
        ],
        "server": "user@host:22",
        "transport": "ssh",
        "server_version": "OpenSSH_9.6p1",
        "cipher": "aes256-gcm@openssh.com",
        "mac": "hmac-sha2-256-etm@openssh.com",
    }
    assert " " not in first, "compact separators: one short line per event"


def test_json_renderer_ready_without_session() -> None:
    stream = io.StringIO()
    JsonRenderer(stream, clock=lambda: FIXED_TIME)(READY)
    (record,) = _json_lines(stream)
    assert record["event"] == "ready"
    assert "cipher" not in record


def test_json_renderer_one_object_per_event_after_ready() -> None:
    stream = io.StringIO()
    times = iter([10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.1234567])
    render = JsonRenderer(stream, clock=lambda: next(times))
    render(SESSION_UP)  # folded, does not read the clock
    render(READY)
    connection = info()
    render(events.ClientAccepted(connection))
    render(events.RequestParsed(connection, "socks5", "CONNECT", "example.com", 443, True))
    render(events.ChannelOpened(connection, 0.25))
    render(events.ConnectionClosed(connection, 10, 20, 1.5))
    render(events.SessionLost("user@host:22", "EOF"))
    render(events.Stopping("interrupted"))
    records = _json_lines(stream)
    assert [record["event"] for record in records] == [
        "ready", "client_accepted", "request_parsed", "channel_opened", "connection_closed",
        "session_lost", "stopping",
    ]  # fmt: skip
    assert [record["time"] for record in records] == [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.123457]
    for record in records:
        assert list(record)[:2] == ["event", "time"]
    assert records[3] == {
        "event": "channel_opened", "time": 13.0, "id": 7, "client": "127.0.0.1:50000",
        "host": "example.com", "port": 443, "latency": 0.25,
    }  # fmt: skip
    assert records[4]["bytes_up"] == 10
    assert records[4]["bytes_down"] == 20
    assert records[2]["sent_name"] is True


def test_json_renderer_stopping_before_ready_is_printed() -> None:
    # A run that stops before it is ready (bad host key, no listener) still tells why.
    stream = io.StringIO()
    render = JsonRenderer(stream, clock=lambda: FIXED_TIME)
    render(events.ListenerStarted(LISTENER4))
    render(events.Stopping("host key rejected"))
    render(events.Notice("after"))
    records = _json_lines(stream)
    assert [record["event"] for record in records] == ["stopping", "notice"]
    assert records[0]["reason"] == "host key rejected"


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (events.ListenerStarted(LISTENER6),
         {"event": "listener_started", "time": 1.5, "host": "::1", "port": 1080,
          "url": "socks5h://[::1]:1080", "remote": False}),
        (events.ReconnectScheduled("h", 2.0, 3, "EOF"),
         {"event": "reconnect_scheduled", "time": 1.5, "server": "h", "delay": 2.0,
          "attempt": 3, "reason": "EOF", "cause": "lost"}),
        (events.ChannelFailed(info(), 4, "host unreachable", "No route to host"),
         {"event": "channel_failed", "time": 1.5, "id": 7, "client": "127.0.0.1:50000",
          "host": "example.com", "port": 443, "reply": 4, "reply_label": "host unreachable",
          "reason": "No route to host"}),
        (events.Notice("hello", "dns"),
         {"event": "notice", "time": 1.5, "message": "hello", "key": "dns"}),
        (events.Ready((), "h"), {"event": "ready", "time": 1.5, "listeners": [], "server": "h",
          "transport": "ssh"}),
    ],
    ids=["listener-started", "reconnect-scheduled", "channel-failed", "notice", "ready-empty"],
)  # fmt: skip
def test_event_record(event: events.Event, expected: dict[str, object]) -> None:
    record = event_record(event, 1.5)
    assert json.loads(json.dumps(record)) == expected
    assert list(record)[:2] == ["event", "time"]


def test_tee_sends_every_event_to_every_sink() -> None:
    seen: list[tuple[str, events.Event]] = []
    tee = Tee(lambda e: seen.append(("a", e)), lambda e: seen.append(("b", e)))
    stop = events.Stopping("x")
    tee(stop)
    assert seen == [("a", stop), ("b", stop)]


# ---- human formats ----


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (10 * 1024 + 512, "10.5 KiB"),
        (1024**2, "1.0 MiB"),
        (5 * 1024**2 + 1024**2 // 2, "5.5 MiB"),
        (1024**3, "1.0 GiB"),
        (3 * 1024**4, "3072.0 GiB"),
    ],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 ms"),
        (0.0004, "0 ms"),
        (0.25, "250 ms"),
        (1, "1.0 s"),
        (59.94, "59.9 s"),
        (119.9, "119.9 s"),
        (120, "2m00s"),
        (125.9, "2m05s"),
        (3599, "59m59s"),
        (3600, "1h00m00s"),
        (90061, "25h01m01s"),
    ],
)
def test_human_seconds(seconds: float, text: str) -> None:
    assert human_seconds(seconds) == text


# Regression (fixed in 1fbb3b9): values just under a unit boundary used to round up
# inside the smaller unit ("1024.0 KiB", "1000 ms").
@pytest.mark.parametrize(
    ("value", "formatter", "text"),
    [
        (1024**2 - 1, human_bytes, "1.0 MiB"),
        (1023.6, human_bytes, "1.0 KiB"),
        (1024**2 - 52, human_bytes, "1023.9 KiB"),
        (0.9996, human_seconds, "1.0 s"),
        (0.9994, human_seconds, "999 ms"),
    ],
    ids=["kib-to-mib", "b-to-kib", "stays-kib", "ms-to-s", "stays-ms"],
)
def test_human_formats_round_across_unit_boundaries(
    value: float, formatter: Callable[[float], str], text: str
) -> None:
    assert formatter(value) == text


def test_quiet_says_nothing_of_a_client_that_sent_nothing(utc: None) -> None:
    stream = io.StringIO()
    render = PlainRenderer(stream, quiet=True, clock=lambda: FIXED_TIME)
    probe = events.ConnectionInfo(id=1, client="127.0.0.1:50000", started=1.0)
    render(events.ClientAccepted(probe))
    render(events.ClientRejected(probe, "client closed without sending a request", empty=True))
    assert stream.getvalue() == ""
    # One that sent half a greeting and left is still a problem worth a line.
    render(events.ClientRejected(info(2), "client closed its side during the handshake"))
    assert "#2 127.0.0.1:50000 rejected" in stream.getvalue()

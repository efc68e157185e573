"""The live view (:class:`LiveRenderer`) drawn on a recording rich console with a fake
clock, and the JSON record of every event type against the README's schema.

Events go in through the renderer's own ``__call__``, as the app sends them; the view is
read back by rendering ``render()`` on a console of the same size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tunnel import cli, events
from tunnel.live import LiveRenderer
from tunnel.ui import (
    DNS_HINT,
    JsonRenderer,
    _snake,
    destination,
    error_record,
    event_record,
    human_bytes,
)

WIDTH, HEIGHT = 100, 30
SERVER = "alice@bastion.example:22"
LISTENER = events.Listener("127.0.0.1", 1080)
LISTENER6 = events.Listener("::1", 1080)
START = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_console() -> Console:
    return Console(record=True, width=WIDTH, height=HEIGHT, force_terminal=True, file=io.StringIO())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def view(clock: FakeClock) -> Iterator[LiveRenderer]:
    renderer = LiveRenderer(make_console(), "bastion.example", clock=clock)
    try:
        yield renderer
    finally:
        renderer.stop()  # ends rich's Live, which took over sys.stderr


def screen(view: LiveRenderer) -> str:
    """What the view shows now, as plain text."""
    console = Console(
        record=True,
        width=view.console.width,
        height=view.console.height,
        force_terminal=True,
        file=io.StringIO(),
    )
    console.print(view.render())
    return console.export_text()


def printed(view: LiveRenderer) -> str:
    """What the view printed above itself (and its frames) so far."""
    return view.console.export_text()


def bring_up(view: LiveRenderer, clock: FakeClock) -> None:
    view(events.ListenerStarted(LISTENER))
    view(events.ListenerStarted(LISTENER6))
    view(events.SessionConnecting(SERVER, 1))
    view(
        events.SessionUp(
            SERVER, "OpenSSH_9.6p1", "aes128-gcm@openssh.com", "curve25519-sha256",
            "hmac-sha2-256-etm@openssh.com", "none",
        )
    )  # fmt: skip
    view(events.Ready((LISTENER, LISTENER6), SERVER))


_ids = iter(range(1, 1_000_000))


def connection(
    clock: FakeClock, host: str, port: int, protocol: str = "socks5", **fields: Any
) -> events.ConnectionInfo:
    conn_id = next(_ids)
    return events.ConnectionInfo(
        id=conn_id,
        client=f"127.0.0.1:{40000 + conn_id % 20000}",
        started=clock.now,
        listener="127.0.0.1:1080",
        protocol=protocol,
        host=host,
        port=port,
        **fields,
    )


def open_one(
    view: LiveRenderer, clock: FakeClock, host: str, port: int, protocol: str = "socks5"
) -> events.ConnectionInfo:
    info = connection(clock, host, port, protocol)
    view(events.ClientAccepted(info))
    view(events.RequestParsed(info, protocol, "CONNECT", host, port, True))
    info.open = True
    view(events.ChannelOpened(info, 0.012))
    return info


def fail_one(view: LiveRenderer, clock: FakeClock, host: str, port: int, reason: str) -> None:
    info = connection(clock, host, port)
    view(events.ClientAccepted(info))
    view(events.RequestParsed(info, "socks5", "CONNECT", host, port, True))
    view(events.ChannelFailed(info, 5, "connection refused", reason))


# == the view ==============================================================================


def test_header_shows_server_state_cipher_and_listeners(
    view: LiveRenderer, clock: FakeClock
) -> None:
    bring_up(view, clock)
    clock.advance(5)
    text = screen(view)
    first, second = text.splitlines()[:2]
    assert SERVER in first
    assert "● up 5.0 s" in first
    assert "aes128-gcm@openssh.com" in first
    assert "OpenSSH_9.6p1" in first
    assert second.split() == ["listening:", "socks5h://127.0.0.1:1080", "socks5h://[::1]:1080"]
    assert "no open connections" in text


def test_state_before_the_session_is_up(view: LiveRenderer, clock: FakeClock) -> None:
    view(events.ListenerStarted(LISTENER))
    view(events.SessionConnecting(SERVER, 1))
    text = screen(view)
    assert "● connecting" in text
    assert SERVER in text


def test_open_connections_show_destination_protocol_and_bytes(
    view: LiveRenderer, clock: FakeClock
) -> None:
    bring_up(view, clock)
    web = open_one(view, clock, "intranet.example", 443)
    clock.advance(2)
    api = open_one(view, clock, "2001:db8::7", 8443, protocol="http-connect")
    clock.advance(1)
    old = open_one(view, clock, "10.0.0.5", 22, protocol="socks4a")
    web.bytes_up, web.bytes_down = 2048, 3 * 1024 * 1024
    api.bytes_up, api.bytes_down = 512, 1536
    clock.advance(1)
    rows = {
        line.split()[0]: line for line in screen(view).splitlines() if line.strip()[:1].isdigit()
    }
    assert set(rows) == {str(web.id), str(api.id), str(old.id)}
    assert all(
        word in rows[str(web.id)].split()
        for word in [web.client, "intranet.example:443", "SOCKS5", "2.0", "KiB", "3.0", "MiB"]
    )
    assert "4.0 s" in rows[str(web.id)]  # age
    assert "[2001:db8::7]:8443" in rows[str(api.id)]
    assert "HTTP CONNECT" in rows[str(api.id)]
    assert "512 B" in rows[str(api.id)]
    assert "1.5 KiB" in rows[str(api.id)]
    assert "SOCKS4a" in rows[str(old.id)]
    assert "0 B" in rows[str(old.id)]
    # Newest first.
    order = [line.split()[0] for line in screen(view).splitlines() if line[:1].strip().isdigit()]
    assert order == sorted(order, key=int, reverse=True)


def test_routes_show_each_destinations_state_and_each_connections_way(
    view: LiveRenderer, clock: FakeClock
) -> None:
    bring_up(view, clock)
    view(events.Ready((LISTENER,), SERVER, "main"))
    view(events.SessionConnecting("tester@127.0.0.1:2222", 1, upstream="lab"))
    view(
        events.SessionUp("tester@127.0.0.1:2222", "OpenSSH", "c", "k", "m", "none", upstream="lab")
    )
    view(events.SessionConnecting("tester@127.0.0.1:2223", 1, upstream="spare"))
    view(events.SessionLost("tester@127.0.0.1:2223", "refused", upstream="spare"))
    plain = open_one(view, clock, "intranet.example", 443)
    routed = connection(clock, "db.lab", 5432, upstream="lab")
    view(events.ChannelOpened(routed, 0.01))
    text = screen(view)
    first, _, ways = text.splitlines()[:3]
    # The command line's session stays the header's; a route's does not replace it.
    assert SERVER in first
    assert "● up" in first
    assert ways.split() == ["routes:", "lab", "●", "up", "spare", "●", "lost"]
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()[:1].isdigit()}
    assert "lab" in rows[str(routed.id)].split()
    assert "way" in text.split()
    assert str(plain.id) in rows


@pytest.mark.parametrize("failures", [0, 3])
def test_more_connections_than_fit_say_how_many_more(
    view: LiveRenderer, clock: FakeClock, failures: int
) -> None:
    bring_up(view, clock)
    opened = [open_one(view, clock, f"host{n}.example", 443) for n in range(40)]
    for n in range(failures):
        fail_one(view, clock, f"gone{n}.example", 80, "Connection refused")
    text = screen(view)
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= HEIGHT, text
    shown = [info for info in opened if f"host{opened.index(info)}.example:443" in text]
    [more] = re.findall(r"\+(\d+) more", text)
    assert int(more) > 0
    assert len(shown) + int(more) == len(opened)
    assert f"host{len(opened) - 1}.example:443" in text  # the newest are the ones shown
    assert "host0.example:443" not in text
    assert lines[-1].split()[:2] == ["served", "40"]


def test_view_fits_the_terminal_when_the_header_wraps(clock: FakeClock) -> None:
    view = LiveRenderer(make_console(), "x", clock=clock)
    try:
        server = "root@127.0.0.1:37065"
        view(events.ListenerStarted(LISTENER))
        view(events.SessionConnecting(server, 1))
        version = "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10"
        view(events.SessionUp(server, version, "aes128-gcm@openssh.com", "", "", "none"))
        for n in range(40):
            open_one(view, clock, f"host{n}.example", 443)
        text = screen(view)
        assert len(text.rstrip("\n").splitlines()) <= HEIGHT, text
        assert text.rstrip("\n").splitlines()[-1].split()[:2] == ["served", "40"]
    finally:
        view.stop()


def test_last_failures_show_the_servers_reason(view: LiveRenderer, clock: FakeClock) -> None:
    bring_up(view, clock)
    for n in range(7):
        fail_one(view, clock, f"db{n}.internal", 5432, f"Connection refused (try {n})")
    text = screen(view)
    assert "last failures:" in text
    failure_lines = [line for line in text.splitlines() if ".internal:5432" in line]
    assert len(failure_lines) == 5  # the last five only
    assert "db0.internal" not in text
    assert "db1.internal" not in text
    for n, line in zip(range(2, 7), failure_lines, strict=True):
        assert f"db{n}.internal:5432" in line
        assert "connection refused (0x05)" in line
        assert f"Connection refused (try {n})" in line
    assert "failed 7" in " ".join(text.splitlines()[-1].split())


def test_totals_count_open_and_closed_bytes(view: LiveRenderer, clock: FakeClock) -> None:
    bring_up(view, clock)
    first = open_one(view, clock, "a.example", 80)
    second = open_one(view, clock, "b.example", 80)
    fail_one(view, clock, "c.example", 80, "Connection refused")
    first.bytes_up, first.bytes_down = 1000, 4000
    second.bytes_up, second.bytes_down = 24, 96
    view(events.ConnectionClosed(first, 1000, 4000, 3.0))
    totals = " ".join(screen(view).splitlines()[-1].split())
    assert totals.startswith("served 2 failed 1 open 1 ")
    assert f"up {human_bytes(1024)}" in totals
    assert f"down {human_bytes(4096)}" in totals
    assert "b.example:80" in screen(view)
    assert "a.example:80" not in screen(view)


def test_reconnect_shows_a_countdown(view: LiveRenderer, clock: FakeClock) -> None:
    bring_up(view, clock)
    clock.advance(60)
    view(events.SessionLost(SERVER, "Connection reset by peer"))
    assert "● lost" in screen(view)
    view(events.ReconnectScheduled(SERVER, 8.0, 1, "Connection refused"))
    clock.advance(3)
    assert "● reconnecting in 5.0 s" in screen(view)
    clock.advance(4.5)
    assert "● reconnecting in 0.5 s" in screen(view)
    clock.advance(10)
    assert "● reconnecting in 0.0 s" in screen(view)  # never negative
    view(events.SessionConnecting(SERVER, 2))
    assert "● connecting" in screen(view)
    view(events.SessionUp(SERVER, "OpenSSH_9.6p1", "aes128-gcm@openssh.com", "", "", "none"))
    clock.advance(2)
    assert "● up 2.0 s" in screen(view)
    # Losing and rescheduling are also said above the view, once each.
    above = printed(view)
    assert above.count(f"lost {SERVER}: Connection reset by peer") == 1
    assert above.count("reconnecting in 8.0 s (attempt 1): Connection refused") == 1


def test_summary(view: LiveRenderer, clock: FakeClock) -> None:
    bring_up(view, clock)
    done = open_one(view, clock, "a.example", 80)
    done.bytes_up, done.bytes_down = 300, 5 * 1024 * 1024
    view(events.ConnectionClosed(done, 300, 5 * 1024 * 1024, 2.0))
    still = open_one(view, clock, "b.example", 80)
    still.bytes_up = 2048
    fail_one(view, clock, "c.example", 80, "Connection refused")
    view(events.ClientRejected(connection(clock, "", 0), "not a SOCKS or HTTP client"))
    clock.advance(125)
    summary = str(view.summary())
    assert summary == (
        f"pytunnel {SERVER} ran 2m05s: 2 served, 1 failed, 1 rejected, 2.3 KiB up, 5.0 MiB down"
    )


def test_stopping_prints_the_summary_once_and_ends_the_view(
    view: LiveRenderer, clock: FakeClock
) -> None:
    bring_up(view, clock)
    open_one(view, clock, "a.example", 80)
    assert view.live.is_started
    view.console.export_text(clear=True)
    clock.advance(3)
    view(events.Stopping("interrupted"))
    assert not view.live.is_started
    text = printed(view)
    assert text.rstrip("\n").splitlines()[-1] == (
        f"pytunnel {SERVER} ran 3.0 s: 1 served, 0 failed, 0 rejected, 0 B up, 0 B down"
    )
    view.console.export_text(clear=True)
    view(events.ChannelOpened(connection(clock, "late.example", 80), 0.1))
    view(events.Stopping("again"))
    assert not view.live.is_started
    assert printed(view) == ""


def test_pause_and_resume_hand_the_terminal_to_a_prompt(
    view: LiveRenderer, clock: FakeClock
) -> None:
    bring_up(view, clock)
    assert view.live.is_started
    view.pause()
    assert not view.live.is_started
    view.resume()
    assert view.live.is_started


async def test_the_timer_redraws_with_rates(clock: FakeClock) -> None:
    view = LiveRenderer(make_console(), "bastion.example", clock=clock)
    try:
        bring_up(view, clock)
        info = open_one(view, clock, "stream.example", 443)
        deadline = asyncio.get_running_loop().time() + 10
        while "/s" not in " ".join(screen(view).splitlines()[3].split()[7:]):
            assert asyncio.get_running_loop().time() < deadline, screen(view)
            clock.advance(1)
            info.bytes_down += 1024 * 1024
            await asyncio.sleep(view.REFRESH)
        row = " ".join(screen(view).splitlines()[3].split())
        assert row.endswith("1.0 MiB/s"), row
        totals = " ".join(screen(view).splitlines()[-1].split())
        assert totals.endswith("now 1.0 MiB/s"), totals
    finally:
        view.stop()


# -- the DNS-leak hint ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "sent_name", "hinted"),
    [
        ("93.184.216.34", False, True),
        ("2606:4700:4700::1111", False, True),
        ("10.1.2.3", False, False),
        ("172.16.0.9", False, False),
        ("192.168.1.1", False, False),
        ("127.0.0.1", False, False),
        ("::1", False, False),
        ("169.254.1.1", False, False),
        ("intranet.example", True, False),
        ("93.184.216.34", True, False),  # the client sent it as a name: it did not resolve
    ],
)
def test_dns_leak_hint(
    view: LiveRenderer, clock: FakeClock, host: str, sent_name: bool, hinted: bool
) -> None:
    bring_up(view, clock)
    info = connection(clock, host, 443)
    view(events.RequestParsed(info, "socks5", "CONNECT", host, 443, sent_name))
    flat = " ".join(printed(view).split())
    assert (" ".join(DNS_HINT.split()) in flat) is hinted
    assert ("local DNS" in screen(view)) is hinted


def test_dns_leak_hint_is_given_once(view: LiveRenderer, clock: FakeClock) -> None:
    bring_up(view, clock)
    for host in ("93.184.216.34", "1.1.1.1", "93.184.216.34"):
        info = connection(clock, host, 443)
        view(events.RequestParsed(info, "socks4", "CONNECT", host, 443, False))
    flat = " ".join(printed(view).split())
    assert flat.count(" ".join(DNS_HINT.split())) == 1
    assert "local DNS 3" in " ".join(screen(view).split())
    assert str(view.summary()).endswith(", 3 resolved locally (DNS leak)")


# == JSON records: the README's schema =====================================================
#
# The README's --json table is the one statement of the schema: these tests read it, and
# hold every record the JSON renderer writes to it (names, types, when present).

README = Path(__file__).resolve().parents[2] / "README.md"
_TYPES: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
}
_FIELD = re.compile(r"`(\w+)` (" + "|".join(_TYPES) + r")\b")


@dataclasses.dataclass(frozen=True)
class Documented:
    always: dict[str, str]
    sometimes: dict[str, str]


def readme_schema() -> dict[str, Documented]:
    """The README's ``| event | always | only when |`` table, event by event."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("| event | always | only when |")
    schema: dict[str, Documented] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        name, always, sometimes = (cell.strip() for cell in line.strip("|").split("|"))
        schema[name.strip("`")] = Documented(
            dict(_FIELD.findall(always)), dict(_FIELD.findall(sometimes))
        )
    return schema


SCHEMA = readme_schema()


def sample_info(**fields: Any) -> events.ConnectionInfo:
    values: dict[str, Any] = dict(
        id=3, client="127.0.0.1:50000", started=START, listener="127.0.0.1:1080",
        protocol="socks5", host="db.internal", port=5432,
    )  # fmt: skip
    values.update(fields)
    return events.ConnectionInfo(**values)


def fresh_info() -> events.ConnectionInfo:
    """A connection as it is when accepted: no request read yet."""
    return events.ConnectionInfo(id=4, client="127.0.0.1:50001", started=START)


SESSION_UP = events.SessionUp("s", "OpenSSH_9.6p1", "aes128-gcm@openssh.com", "k", "m", "none")
REMOTE = events.Listener("127.0.0.1", 2080, remote=True)

# Every kind of event, with every optional field both present and absent somewhere.
SAMPLES: list[events.Event] = [
    SESSION_UP,
    events.Ready((LISTENER, LISTENER6), "s", "bastion"),
    events.ListenerStarted(REMOTE),
    events.SessionConnecting("s", 2),
    events.SessionConnecting("s", 1, upstream="lab"),
    events.SessionLost("s", "EOF", upstream="lab"),
    events.ReconnectScheduled("s", 1.5, 2, "EOF", upstream="lab"),
    events.SessionProbed("s", "sleep", False),
    events.ClientAccepted(fresh_info()),
    events.RequestParsed(sample_info(), "socks5", "CONNECT", "db.internal", 5432, True),
    events.ChannelOpened(sample_info(upstream="lab"), 0.5),
    events.ChannelFailed(sample_info(upstream="reject"), 2, "not allowed", "rejected by route"),
    events.ChannelOpened(sample_info(isolation="alice"), 0.5),
    events.IsolatedSession("alice", "s", "closed", "no connection for 300 s"),
    events.ChannelFailed(sample_info(isolation="bob"), 1, "general failure", "auth failed"),
    events.ConnectionClosed(sample_info(isolation="bob"), 1, 2, 3.0),
    events.DatagramsDropped(sample_info(dropped=1, isolation="b"), "not DNS", "192.0.2.1:1"),
    events.ClientRejected(sample_info(isolation="bob"), "idle"),
    events.ChannelFailed(sample_info(), 5, "connection refused", "Connection refused"),
    events.ConnectionClosed(sample_info(), 1, 2, 3.0),
    events.ConnectionClosed(sample_info(protocol="socks5-udp", dropped=4, upstream="a"), 1, 2, 3),
    events.DatagramsDropped(sample_info(dropped=1), "not DNS", "192.0.2.1:123"),
    events.IncomingRefused("127.0.0.1", 2080, "127.0.0.1:50000", "no such listener"),
    events.ClientRejected(sample_info(), "bad", auth=True),
    events.ClientRejected(fresh_info(), "client closed without sending a request", empty=True),
    events.Notice("hello", "dns"),
    events.Status("s", "up", 61.5, 120.0, 1, 2, 30, 4, 5, 6000, 70000),
    events.Stopping("interrupted"),
    # Riding an OpenSSH master: its PID instead of the session's facts.
    events.Ready((LISTENER,), "m", "bastion", "openssh-master", 4242),
]


def written(samples: list[events.Event]) -> list[dict[str, Any]]:
    """What the JSON renderer writes for ``samples`` (``ready`` first), parsed back."""
    out = io.StringIO()
    renderer = JsonRenderer(out, clock=lambda: START + 0.25)
    for event in samples:
        renderer(event)
    renderer.flush()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def check_record(record: dict[str, Any]) -> None:
    assert list(record)[:2] == ["event", "time"], record
    assert isinstance(record["event"], str)
    assert _TYPES["number"](record["time"]), record
    documented = SCHEMA[record["event"]]
    fields = {key: value for key, value in record.items() if key not in ("event", "time")}
    missing = set(documented.always) - set(fields)
    assert not missing, (record, missing)
    for key, value in fields.items():
        kind = documented.always.get(key) or documented.sometimes.get(key)
        assert kind is not None, f"{record['event']}: {key} is not in the README: {record}"
        assert _TYPES[kind](value), (record, key, kind)
        assert value != "" or kind != "string" or key == "key", (record, key)


def test_the_readme_table_is_read() -> None:
    # A table the parser misread would make every check below vacuous.
    assert SCHEMA["client_accepted"] == Documented({"id": "integer", "client": "string"}, {})
    assert SCHEMA["client_rejected"].sometimes == {
        "host": "string",
        "port": "integer",
        "isolation": "string",
    }
    assert SCHEMA["error"].always == {"message": "string", "exit_status": "integer"}
    assert len(SCHEMA["session_up"].always) == 5
    assert SCHEMA["session_up"].sometimes == {
        "kex": "string",
        "cause": "string",
        "outage": "number",
        "upstream": "string",
    }


def test_schema_covers_every_event_type() -> None:
    names = {_snake(kind.__name__) for kind in events.Event.__args__}  # type: ignore[attr-defined]
    assert set(SCHEMA) == names | {"error"}
    assert {_snake(type(event).__name__) for event in SAMPLES} == names


def test_every_record_written_follows_the_readme() -> None:
    records = written(SAMPLES)
    # Before "ready" the JSON renderer folds the facts in: the session comes after it.
    assert records[0]["event"] == "ready"
    assert {record["event"] for record in records} == set(SCHEMA) - {"error"} - {"session_up"}
    for record in records:
        check_record(record)
    for listener in records[0]["listeners"]:
        check_record({"event": "listener_started", "time": 0.0, **listener})
    # Each optional field is seen present at least once, so the table says no more than
    # is written.
    seen = {(record["event"], key) for record in records for key in record}
    for name, documented in SCHEMA.items():
        if name == "session_up":
            continue  # folded into "ready" here; its own test below
        for key in documented.sometimes:
            assert (name, key) in seen, (name, key)


def test_session_up_after_ready_follows_the_readme() -> None:
    [_, record] = written([events.Ready((LISTENER,), "s"), SESSION_UP])
    check_record(record)
    assert record["kex"] == SESSION_UP.kex
    # A route's destination's session names it.
    [_, routed] = written([events.Ready((LISTENER,), "s"), replace(SESSION_UP, upstream="lab")])
    check_record(routed)
    assert routed["upstream"] == "lab"
    assert "cause" not in record
    assert "outage" not in record


def test_session_up_after_an_outage_says_why_and_how_long() -> None:
    back = dataclasses.replace(SESSION_UP, cause="sighup", outage=0.75)
    [_, record] = written([events.Ready((LISTENER,), "s"), back])
    check_record(record)
    assert (record["cause"], record["outage"]) == ("sighup", 0.75)


def test_fields_not_known_yet_are_left_out() -> None:
    accepted, rejected = (
        event_record(event, START)
        for event in (
            events.ClientAccepted(fresh_info()),
            events.ClientRejected(fresh_info(), "timed out"),
        )
    )
    assert set(accepted) == {"event", "time", "id", "client"}
    assert "host" not in rejected
    assert "port" not in rejected


def test_error_record_has_a_time_and_follows_the_readme() -> None:
    record = error_record("cannot listen on 127.0.0.1:1080", 3, START)
    check_record(record)
    assert record["time"] == START


def test_error_line_of_the_cli_has_a_time(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--json", "-D", "1080", "-4", "-6", "host"])
    assert exited.value.code == 2
    [line] = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["event"] == "error"
    check_record(record)


def test_json_record_values_follow_the_event() -> None:
    info = sample_info()
    rejected = event_record(events.ClientRejected(info, "wrong password", auth=True), 1.0)
    assert (rejected["id"], rejected["client"], rejected["auth"]) == (3, "127.0.0.1:50000", True)
    up = event_record(SESSION_UP, 1.0)
    assert {k: up[k] for k in ("server_version", "cipher", "kex", "mac", "compression")} == {
        field.name: getattr(SESSION_UP, field.name)
        for field in dataclasses.fields(SESSION_UP)
        if field.name not in ("server", "upstream", "cause", "outage")
    }
    # A key exchange asyncssh did not tell is left out, not sent empty.
    unknown = dataclasses.replace(SESSION_UP, kex="")
    assert "kex" not in event_record(unknown, 1.0)
    parsed = event_record(
        events.RequestParsed(info, "http-connect", "CONNECT", "other.example", 443, True), 1.0
    )
    # The request's own host and port, not those the connection had before.
    assert (parsed["host"], parsed["port"], parsed["protocol"]) == (
        "other.example",
        443,
        "http-connect",
    )


def test_totals_count_wrong_proxy_credentials() -> None:
    console = Console(record=True, width=100, height=30, force_terminal=True, file=io.StringIO())
    view = LiveRenderer(console, "u@h", clock=lambda: 10.0)
    info = events.ConnectionInfo(id=1, client="127.0.0.1:5", started=9.0)
    view.stats.apply(events.ClientRejected(info, "wrong proxy credentials", auth=True), 10.0)
    console.print(view.render())
    assert "bad logins 1" in console.export_text()


def test_udp_bind_and_remote_listener_are_shown(view: LiveRenderer, clock: FakeClock) -> None:
    remote = events.Listener("127.0.0.1", 2080, remote=True)
    bring_up(view, clock)
    view(events.ListenerStarted(remote))
    association = connection(clock, "127.0.0.1", 40001, protocol="socks5-udp")
    view(events.ChannelOpened(association, 0.001))
    view(events.ChannelOpened(connection(clock, "127.0.0.2", 21, protocol="socks5-bind"), 0.1))
    association.dropped = 2
    view(events.DatagramsDropped(association, "not DNS: needs --udp-helper", "192.0.2.1:123"))
    shown = screen(view)
    assert "socks5h://127.0.0.1:2080 (on the server)" in shown
    assert "SOCKS5 UDP" in shown
    assert "SOCKS5 BIND" in shown
    assert "UDP dropped 2" in shown
    # The reason is printed above the view, once.
    assert printed(view).count("UDP datagram to 192.0.2.1:123 dropped: not DNS") == 1


def test_refused_incoming_connection_is_printed_once(view: LiveRenderer, clock: FakeClock) -> None:
    bring_up(view, clock)
    view(events.IncomingRefused("127.0.0.1", 2080, "127.0.0.1:50000", "no such listener"))
    line = "127.0.0.1:50000 -> 127.0.0.1:2080 (on the server) refused: no such listener"
    assert printed(view).count(line) == 1


# == narrow terminals ======================================================================

_NUMBER = re.compile(r"\b\d+(?:\.\d)? (?:B|KiB|MiB|GiB)\b")


def busy_view(clock: FakeClock, width: int) -> tuple[LiveRenderer, list[events.ConnectionInfo]]:
    console = Console(
        record=True, width=width, height=HEIGHT, force_terminal=True, file=io.StringIO()
    )
    view = LiveRenderer(console, "bastion.example", clock=clock)
    bring_up(view, clock)
    opened = [
        open_one(view, clock, "127.0.0.1", 44321),
        open_one(view, clock, "localhost", 8080, protocol="http-connect"),
        open_one(view, clock, "2001:db8::7", 8443, protocol="socks4a"),
        open_one(view, clock, "a-rather-long-host-name.intranet.example", 443),
    ]
    for n, info in enumerate(opened):
        info.bytes_up, info.bytes_down = 1536 * (n + 1), 3 * 1024 * 1024 * (n + 1)
    view._sample(clock())
    clock.advance(1)
    for info in opened:
        info.bytes_down += 700 * 1024
    view._sample(clock())
    fail_one(view, clock, "db.internal", 5432, "Connection refused")
    return view, opened


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_narrow_terminals_keep_ports_and_units(clock: FakeClock, width: int) -> None:
    view, opened = busy_view(clock, width)
    try:
        text = screen(view)
        lines = text.rstrip("\n").splitlines()
        assert all(len(line) <= width for line in lines), text
        assert len(lines) <= HEIGHT
        rows = {line.split()[0]: line for line in lines if line[:1].strip().isdigit()}
        assert set(rows) == {str(info.id) for info in opened}, text
        for info in opened:
            row = rows[str(info.id)]
            # The destination keeps its port; at most its host is cut (at the left).
            assert re.search(rf"(^|\s)\S*:{info.port}(\s|$)", row), row
            shown = row.split()[1] if "client" not in lines[2] else row.split()[2]
            assert shown.endswith(f":{info.port}"), row
            assert destination(info).endswith(shown.lstrip("…")), row
            # Up and down whole, with their units.
            assert human_bytes(info.bytes_up) in row, row
            assert human_bytes(info.bytes_down) in row, row
            assert "…" not in row.split(f":{info.port}", 1)[1], row
        totals = " ".join(" ".join(lines[-2:]).split())
        for word in ("served 4", "failed 1", "open 4", "now "):
            assert word in totals, text
        for number in _NUMBER.findall(totals):
            assert number in " ".join(totals.split()), totals
        assert "…" not in " ".join(lines[-2:]), text
        # Header: the session's state and uptime whole; every listener whole or counted.
        assert "● up " in lines[0]
        assert re.search(r"● up \d+(\.\d)? (ms|s)\b", lines[0]), lines[0]
        assert "…" not in lines[1], text
        assert "socks5h://127.0.0.1:1080" in lines[1], text
        assert "socks5h://[::1]:1080" in lines[1] or "+1 more" in lines[1], text
        heading = lines[2].split()
        if width >= 120:
            assert heading == ["#", "client", "destination", "via", "age", "up", "down", "rate"]
            assert "a-rather-long-host-name.intranet.example:443" in text
        # The least useful columns go first: client, then via, then age.
        kept = [name for name in ("client", "via", "age") if name in heading]
        assert kept == ["client", "via", "age"][3 - len(kept) :], heading
        assert {"up", "down"} <= set(heading), heading
    finally:
        view.stop()


def test_the_failures_keep_the_destinations_port(clock: FakeClock) -> None:
    view, _ = busy_view(clock, 40)
    try:
        [line] = [line for line in screen(view).splitlines() if "5432" in line]
        assert line.split()[0] == "db.internal:5432", line
        assert re.search(r"\b0x05\b", line), line  # the reply code whole, never cut
    finally:
        view.stop()


def test_a_client_that_sent_nothing_is_counted_not_a_failure(
    view: LiveRenderer, clock: FakeClock
) -> None:
    bring_up(view, clock)
    for _ in range(3):
        probe = events.ConnectionInfo(id=next(_ids), client="127.0.0.1:5", started=clock())
        view(events.ClientAccepted(probe))
        view(events.ClientRejected(probe, "client closed without sending a request", empty=True))
    text = screen(view)
    assert "last failures" not in text
    assert "unused 3" in " ".join(text.splitlines()[-1].split())
    summary = str(view.summary())
    assert "0 rejected, 3 closed unused," in summary, summary
    assert view.stats.rejected == 0


def test_an_isolated_session_failing_is_printed_and_leaves_the_main_state_alone(
    view: LiveRenderer, clock: FakeClock
) -> None:
    bring_up(view, clock)
    view(events.IsolatedSession("alice", SERVER, "up", "aes128-gcm@openssh.com"))
    view(events.IsolatedSession("gina\\x1b", SERVER, "failed", "Connection refused"))
    assert 'for user "gina\\x1b": failed: Connection refused' in printed(view)
    assert "alice" not in printed(view)  # only what needs attention is printed
    assert "● lost" not in screen(view)

"""Text from the network, rendered: destination names, the server's reasons and banners
reach every renderer (plain lines, -E files, the live view, JSON, sd_notify, log lines,
the terminal prompter) without a raw control character, and rich markup in them is text.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
from rich.console import Console

from tunnel import events
from tunnel.cli import _SafeFormatter
from tunnel.live import LiveRenderer
from tunnel.notify import SystemdNotifier
from tunnel.ui import JsonRenderer, PlainRenderer, TerminalPrompter, describe

# What a hostile client or server sends: a terminal title (OSC), a cursor report request
# (CSI), a forged log line, a bidi override, and rich markup.
OSC_TITLE = "\x1b]0;pwned\x07"
HOSTILE_NAME = f"evil{OSC_TITLE}.example\n2026-12-04T00:00:00 forged line \x1b[6n\u202e"
HOSTILE_REASON = f"Connection refused{OSC_TITLE}\r\nforged: [bold red]markup[/] [/bold]"
RAW_BYTES = ("\x1b", "\x07", "\x9b", "\u202e", "\r")


def hostile_events() -> list[events.Event]:
    info = events.ConnectionInfo(
        id=7, client="127.0.0.1:40000", started=0.0, protocol="socks5", host=HOSTILE_NAME, port=80
    )
    return [
        events.ClientAccepted(info),
        events.RequestParsed(info, "socks5", "CONNECT", HOSTILE_NAME, 80, True),
        events.ChannelFailed(info, 5, "connection refused", HOSTILE_REASON),
        events.ClientRejected(info, f"bad request for {HOSTILE_NAME}"),
        events.DatagramsDropped(info, HOSTILE_REASON, HOSTILE_NAME),
        events.SessionLost("bastion", HOSTILE_REASON),
        events.Notice(HOSTILE_REASON),
    ]


def assert_clean(text: str) -> None:
    for raw in RAW_BYTES:
        assert raw not in text, (raw, text)


def test_describe_escapes_every_text_from_the_network() -> None:
    for event in hostile_events():
        described = describe(event)
        if described is None:
            continue
        line = described[0]
        assert_clean(line)
        assert "\n" not in line


def test_describe_shows_what_was_sent() -> None:
    info = events.ConnectionInfo(id=1, client="c", started=0.0, host="a\nb", port=1)
    described = describe(events.ChannelFailed(info, 5, "connection refused", "x\x1by"))
    assert described is not None
    assert described[0] == "#1 c -> a\\x0ab:1 failed: connection refused (0x05): x\\x1by"


def test_plain_lines_are_one_per_event_and_clean() -> None:
    stream = io.StringIO()
    renderer = PlainRenderer(stream, clock=lambda: 0.0)
    shown = [event for event in hostile_events() if describe(event) is not None]
    for event in shown:
        renderer(event)
    renderer.flush()
    text = stream.getvalue()
    assert_clean(text)
    assert len(text.splitlines()) == len(shown)
    assert "forged" not in "".join(line[:30] for line in text.splitlines())


def test_json_lines_carry_no_raw_control_bytes_and_keep_the_text() -> None:
    stream = io.StringIO()
    renderer = JsonRenderer(stream, clock=lambda: 0.0)
    renderer(events.Ready((), "bastion"))
    for event in hostile_events():
        renderer(event)
    renderer.flush()
    text = stream.getvalue()
    lines = text.splitlines()
    assert len(lines) == 1 + len(hostile_events())
    # json.dumps escapes every control character (and, ensure_ascii, all non-ASCII).
    assert all(0x20 <= ord(char) < 0x7F for char in text.replace("\n", ""))
    records = [json.loads(line) for line in lines]
    # ...and a reader gets the exact text back: the JSON stream hides nothing.
    failed = next(r for r in records if r["event"] == "channel_failed")
    assert failed["host"] == HOSTILE_NAME
    assert failed["reason"] == HOSTILE_REASON


@pytest.fixture
def view() -> Iterator[LiveRenderer]:
    console = Console(record=True, width=200, height=30, force_terminal=True, file=io.StringIO())
    renderer = LiveRenderer(console, "bastion", clock=lambda: 0.0)
    try:
        yield renderer
    finally:
        renderer.stop(summary=False)


def test_live_view_escapes_and_does_not_read_markup(view: LiveRenderer) -> None:
    info = events.ConnectionInfo(
        id=3,
        client="127.0.0.1:40001",
        started=0.0,
        protocol="socks5",
        host=f"[bold]{HOSTILE_NAME}",
        port=443,
    )
    view(events.SessionUp("bastion", f"SSH-2.0-{OSC_TITLE}", "aes", "kex", "mac", "none"))
    view(events.Ready((), "bastion"))
    view(events.ClientAccepted(info))
    view(events.RequestParsed(info, "socks5", "CONNECT", info.host, 443, True))
    info.open = True
    view(events.ChannelOpened(info, 0.01))
    # (A "[/bold]" with nothing open made rich raise MarkupError from the event sink.)
    for event in hostile_events():
        view(event)
    drawn = Console(record=True, width=200, height=30, force_terminal=True, file=io.StringIO())
    drawn.print(view.render())
    screen = drawn.export_text()
    raw = view.console.file.getvalue() + drawn.file.getvalue()  # type: ignore[attr-defined]
    # (rich drops BEL and CR itself, but passes ESC: "\x1b]0;pwned" is the title still.)
    for needle in ("\x1b]0;pwned", "\x1b[6n", "\x07", "\u202e", "\r\n"):
        assert needle not in raw
    assert "[bold]evil" in screen  # the open connection, markup shown as text
    assert "[bold red]markup[/]" in view.console.export_text()  # the notice printed above
    assert "\\x1b]0;pwned\\x07" in screen


def test_sd_notify_status_stays_one_line() -> None:
    notifier = SystemdNotifier.__new__(SystemdNotifier)
    sent: list[str] = []
    notifier.send = sent.append  # type: ignore[method-assign]
    notifier(events.SessionLost("bastion", "bye\nREADY=1\nMAINPID=1"))
    notifier(events.Stopping("server said: bye\nSTATUS=forged"))
    assert sent[0] == "STATUS=session lost: bye\\x0aREADY=1\\x0aMAINPID=1"
    assert sent[1].split("\n") == [
        "STOPPING=1",
        "STATUS=stopping: server said: bye\\x0aSTATUS=forged",
    ]


def test_log_lines_escape_their_arguments_but_keep_tracebacks_readable() -> None:
    formatter = _SafeFormatter("pytunnel: %(message)s")
    record = logging.LogRecord(
        "tunnel.proxy", logging.INFO, __file__, 1, "BIND: refused %s (expected %s)",
        ("10.0.0.1", HOSTILE_NAME), None,
    )  # fmt: skip
    line = formatter.format(record)
    assert_clean(line)
    assert "\n" not in line
    try:
        raise ValueError(f"server said {OSC_TITLE}")
    except ValueError:
        record = logging.LogRecord(
            "tunnel", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    text = formatter.format(record)
    assert_clean(text)
    assert "Traceback (most recent call last):\n" in text


def test_the_servers_banner_and_prompts_reach_the_terminal_escaped() -> None:
    tty = io.StringIO()
    prompter = TerminalPrompter(tty)
    prompter.show(f"Welcome to bastion\n\tauthorised use only{OSC_TITLE}\x1b[2J\n")
    assert tty.getvalue() == "Welcome to bastion\n\tauthorised use only\\x1b]0;pwned\\x07\\x1b[2J\n"
    tty.seek(0)
    tty.truncate()
    prompter._read_line(f"Code{OSC_TITLE}: ")
    assert tty.getvalue() == "Code\\x1b]0;pwned\\x07: "

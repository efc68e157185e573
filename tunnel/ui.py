"""Renderers: they consume events and never touch the core.

* :class:`LiveRenderer`: the rich live view, when stderr is a terminal.
* :class:`PlainRenderer`: one timestamped line per event on stderr (logs, journald).
* :class:`JsonRenderer`: one JSON object per line on stdout, ``ready`` first.
* :class:`TerminalPrompter`: questions on the controlling terminal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sys
import termios
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import events
from .stats import Stats, is_public_address


def human_bytes(count: float) -> str:
    # Compare the rounded value, so 1048575 B reads "1.0 MiB", not "1024.0 KiB".
    for unit in ("B", "KiB", "MiB", "GiB"):
        shown = round(count) if unit == "B" else round(count, 1)
        if shown < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    if round(seconds * 1000) < 1000:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


_PROTOCOL_LABELS = {
    "socks5": "SOCKS5",
    "socks4": "SOCKS4",
    "socks4a": "SOCKS4a",
    "http-connect": "HTTP CONNECT",
    "http": "HTTP",
}


def protocol_label(protocol: str) -> str:
    return _PROTOCOL_LABELS.get(protocol, protocol)


def _destination(info: events.ConnectionInfo) -> str:
    host = f"[{info.host}]" if ":" in info.host else info.host
    return f"{host}:{info.port}"


def describe(event: events.Event) -> tuple[str, bool] | None:
    """One line of text for an event, and whether it reports a problem; None for events
    that are only worth a line in JSON."""
    match event:
        case events.ListenerStarted(listener=listener):
            return f"listening on {listener.url}", False
        case events.Ready(listeners=listeners):
            return "ready: " + " ".join(item.url for item in listeners), False
        case events.SessionConnecting(server=server, attempt=attempt):
            again = f" (attempt {attempt})" if attempt > 1 else ""
            return f"connecting to {server}{again}", False
        case events.SessionUp(server=server, server_version=version, cipher=cipher):
            return f"connected to {server} ({version}, {cipher})", False
        case events.SessionLost(server=server, reason=reason):
            return f"lost {server}: {reason}", True
        case events.ReconnectScheduled(delay=delay, attempt=attempt, reason=reason):
            return f"reconnecting in {delay:.1f} s (attempt {attempt}): {reason}", True
        case events.ClientRejected(connection=info, reason=reason):
            return f"#{info.id} {info.client} rejected: {reason}", True
        case events.ChannelOpened(connection=info, latency=latency):
            return (
                f"#{info.id} {info.client} -> {_destination(info)} "
                f"{protocol_label(info.protocol)} opened in {human_seconds(latency)}",
                False,
            )
        case events.ChannelFailed(connection=info, reply=reply, reply_label=label, reason=why):
            return (
                f"#{info.id} {info.client} -> {_destination(info)} "
                f"failed: {label} (0x{reply:02x}): {why}",
                True,
            )
        case events.ConnectionClosed(connection=info, bytes_up=up, bytes_down=down, duration=d):
            return (
                f"#{info.id} {_destination(info)} closed: {human_bytes(up)} up, "
                f"{human_bytes(down)} down, {human_seconds(d)}",
                False,
            )
        case events.Stopping(reason=reason):
            return f"stopping: {reason}", False
        case events.Notice(message=message):
            return message, True
    return None


class PlainRenderer:
    """Timestamped lines for logs. ``quiet`` keeps only the lines that report problems."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        quiet: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.clock = clock
        self.hint = DnsLeakHint()

    def __call__(self, event: events.Event) -> None:
        if self.hint.check(event):
            self._line(DNS_HINT)
        described = describe(event)
        if described is None:
            return
        text, problem = described
        if self.quiet and not problem:
            return
        self._line(text)

    def _line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.clock()))
        self.stream.write(f"{stamp} {text}\n")
        self.stream.flush()


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def event_record(event: events.Event, now: float) -> dict[str, Any]:
    """The JSON object for one event: ``event`` and ``time`` first, then its fields,
    with a connection flattened to ``id``, ``client``, ``host``, ``port``."""
    record: dict[str, Any] = {"event": _snake(type(event).__name__), "time": round(now, 6)}
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        if isinstance(value, events.ConnectionInfo):
            record.update(id=value.id, client=value.client, host=value.host, port=value.port)
        elif isinstance(value, events.Listener):
            record.update(host=value.host, port=value.port, url=value.url)
        elif isinstance(value, tuple) and value and isinstance(value[0], events.Listener):
            record[field.name] = [
                {"host": item.host, "port": item.port, "url": item.url} for item in value
            ]
        else:
            record[field.name] = value
    return record


class JsonRenderer:
    """JSON lines on stdout. The first line is ``ready``: the facts before it
    (listeners bound, session up) are folded into it, so a script reads one line to
    know where to connect."""

    def __init__(
        self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.stream = stream or sys.stdout
        self.clock = clock
        self._ready = False
        self._session: events.SessionUp | None = None

    def __call__(self, event: events.Event) -> None:
        if not self._ready:
            if isinstance(event, events.SessionUp):
                self._session = event
            if not isinstance(event, events.Ready | events.Stopping):
                return
            self._ready = True
        record = event_record(event, self.clock())
        if isinstance(event, events.Ready) and self._session is not None:
            up = self._session
            record.update(server_version=up.server_version, cipher=up.cipher, mac=up.mac)
        self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.stream.flush()


class Tee:
    """Send every event to several renderers."""

    def __init__(self, *sinks: events.Sink) -> None:
        self.sinks = sinks

    def __call__(self, event: events.Event) -> None:
        for sink in self.sinks:
            sink(event)


class TerminalPrompter:
    """Asks on the controlling terminal (``/dev/tty``), as ssh does, so prompts work
    even when stdout and stderr are redirected. Secrets are read with echo off."""

    def __init__(self, tty: TextIO) -> None:
        self.tty = tty
        self.before_prompt: Callable[[], None] = lambda: None
        self.after_prompt: Callable[[], None] = lambda: None

    @classmethod
    def open(cls) -> TerminalPrompter | None:
        try:
            # A terminal cannot seek, so open() in "r+" text mode refuses it: wrap the raw
            # file by hand, writing through so prompts show before we wait for input.
            raw = io.FileIO("/dev/tty", "r+")
        except OSError:
            return None
        return cls(io.TextIOWrapper(raw, encoding="utf-8", errors="replace", write_through=True))

    def show(self, text: str) -> None:
        self.before_prompt()
        try:
            self.tty.write(text.rstrip("\n") + "\n")
            self.tty.flush()
        finally:
            self.after_prompt()

    def confirm(self, question: str) -> str | None:
        return self.ask(question, True)

    def ask(self, prompt: str, echo: bool) -> str | None:
        self.before_prompt()
        try:
            line = self._read_line(prompt) if echo else self._read_secret(prompt)
            return None if not line else line.rstrip("\r\n")
        except (OSError, EOFError, KeyboardInterrupt):
            return None
        finally:
            self.after_prompt()

    def _read_line(self, prompt: str) -> str:
        self.tty.write(prompt)
        self.tty.flush()
        return self.tty.readline()

    def _read_secret(self, prompt: str) -> str:
        """Echo goes off before the prompt shows, so nothing typed early is echoed."""
        fd = self.tty.fileno()
        old = termios.tcgetattr(fd)
        new = termios.tcgetattr(fd)
        new[3] &= ~termios.ECHO
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, new)
            line = self._read_line(prompt)
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
            self.tty.write("\n")
            self.tty.flush()
        return line


DNS_HINT = (
    "hint: clients are sending IP addresses for public hosts, so they looked the names "
    "up with your local DNS, outside the tunnel. Use socks5h:// (curl --socks5-hostname), "
    "or tick 'Proxy DNS when using SOCKS v5' in the browser."
)


class DnsLeakHint:
    """Says :data:`DNS_HINT` once per run, at the first request that needed it."""

    def __init__(self) -> None:
        self.given = False

    def check(self, event: events.Event) -> bool:
        if (
            not self.given
            and isinstance(event, events.RequestParsed)
            and not event.sent_name
            and is_public_address(event.host)
        ):
            self.given = True
            return True
        return False


class LiveRenderer:
    """The terminal view: a header with the session and listeners, a table of open
    connections sized to the terminal, the last failures and the totals. Redrawn at most
    four times a second by a timer on the event loop (no thread reads the counters while
    the relay writes them); log lines and prompts are printed above it."""

    REFRESH = 0.25

    def __init__(self, console: Console, server: str, *, clock: Callable[[], float]) -> None:
        self.console = console
        self.server = server
        self.clock = clock
        self.stats = Stats()
        self.started = clock()
        self.hint = DnsLeakHint()
        self.live = Live(
            console=console,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=True,
            transient=True,
            get_renderable=self.render,
        )
        self._rates: dict[int, tuple[int, float]] = {}
        self._conn_rates: dict[int, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._running = False
        self._stopped = False

    def __call__(self, event: events.Event) -> None:
        now = self.clock()
        self.stats.apply(event, now)
        if isinstance(event, events.SessionConnecting | events.Ready):
            self.server = event.server
        if self.hint.check(event):
            self.console.print(f"[yellow]{DNS_HINT}[/]")
        if isinstance(event, events.Stopping):
            self.stop()
            return
        if self._stopped:
            return
        if not self._running:
            self.start()
        if isinstance(event, events.Notice | events.SessionLost | events.ReconnectScheduled):
            described = describe(event)
            if described is not None:
                self.console.print(f"[yellow]{described[0]}[/]")

    def start(self) -> None:
        if self._running or self._stopped:
            return
        self._running = True
        self.live.start(refresh=True)
        self._schedule()

    def pause(self) -> None:
        """Hand the terminal to a prompt."""
        if self._running:
            self.live.stop()

    def resume(self) -> None:
        if self._running and not self._stopped:
            self.live.start(refresh=True)

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.REFRESH, self._tick)

    def _tick(self) -> None:
        if self._stopped:
            return
        self._sample(self.clock())
        self.live.refresh()
        self._schedule()

    def _sample(self, now: float) -> None:
        self.stats.sample(now)
        rates: dict[int, float] = {}
        seen: dict[int, tuple[int, float]] = {}
        for conn_id, info in self.stats.open.items():
            total = info.bytes_up + info.bytes_down
            last = self._rates.get(conn_id)
            if last is not None and now > last[1]:
                rates[conn_id] = (total - last[0]) / (now - last[1])
            seen[conn_id] = (total, now)
        self._rates = seen
        self._conn_rates = rates

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        if self._running:
            self.live.stop()
        self.console.print(self.summary())

    def summary(self) -> RenderableType:
        s = self.stats
        lines = Text()
        lines.append(f"pytunnel {self.server}", style="bold")
        lines.append(f" ran {human_seconds(self.clock() - self.started)}: ")
        lines.append(f"{s.served} served, {s.failed} failed, {s.rejected} rejected, ")
        lines.append(f"{human_bytes(s.bytes_up)} up, {human_bytes(s.bytes_down)} down")
        if s.local_dns_requests:
            lines.append(f", {s.local_dns_requests} resolved locally (DNS leak)")
        return lines

    # -- drawing ---------------------------------------------------------------------

    def render(self) -> RenderableType:
        now = self.clock()
        height = self.console.size.height
        failures = self._failures()
        # Header (2 lines), table heading, totals, the failures block, and a spare line
        # so the view never scrolls the terminal.
        used = 5 + (len(self.stats.failures) + 1 if failures is not None else 0)
        parts = [self._header(now), self._connections(now, max(1, height - used))]
        if failures is not None:
            parts.append(failures)
        parts.append(self._totals())
        return Group(*parts)

    def _header(self, now: float) -> RenderableType:
        s = self.stats
        state = Text()
        if s.session_state == "up" and s.session_since is not None:
            state.append("● up ", style="green bold")
            state.append(human_seconds(now - s.session_since))
        elif s.session_state == "waiting" and s.reconnect_at is not None:
            state.append("● reconnecting", style="yellow bold")
            state.append(f" in {max(0.0, s.reconnect_at - now):.1f} s")
        elif s.session_state == "lost":
            state.append("● lost", style="red bold")
        else:
            state.append(f"● {s.session_state}", style="yellow")
        line = Text.assemble(("pytunnel ", "bold"), (self.server, "bold cyan"), "  ", state)
        # One screen line each, whatever the width: the height budget counts on it.
        line.no_wrap = True
        line.overflow = "ellipsis"
        if s.cipher:
            line.append(f"  {s.cipher}", style="dim")
        if s.server_version:
            line.append(f"  {s.server_version}", style="dim")
        urls = Text("listening: ", style="dim", no_wrap=True, overflow="ellipsis")
        urls.append("  ".join(item.url for item in s.listeners) or "-", style="bold")
        return Group(line, urls)

    def _connections(self, now: float, rows: int) -> RenderableType:
        table = Table(box=None, expand=False, pad_edge=False, header_style="bold dim")
        for title, justify in (
            ("#", "right"),
            ("client", "left"),
            ("destination", "left"),
            ("via", "left"),
            ("age", "right"),
            ("up", "right"),
            ("down", "right"),
            ("rate", "right"),
        ):
            table.add_column(title, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        open_now = sorted(self.stats.open.values(), key=lambda info: info.id, reverse=True)
        for info in open_now[:rows]:
            rate = self._conn_rates.get(info.id, 0.0)
            table.add_row(
                str(info.id),
                info.client,
                _destination(info),
                protocol_label(info.protocol),
                human_seconds(now - info.started),
                human_bytes(info.bytes_up),
                human_bytes(info.bytes_down),
                f"{human_bytes(rate)}/s" if rate else "",
            )
        if len(open_now) > rows:
            table.add_row("", f"+{len(open_now) - rows} more", "", "", "", "", "", "")
        if not open_now:
            return Text("no open connections", style="dim")
        return table

    def _failures(self) -> RenderableType | None:
        failures = list(self.stats.failures)
        if not failures:
            return None
        lines = [Text("last failures:", style="bold dim")]
        for failure in failures:
            line = Text(no_wrap=True, overflow="ellipsis")
            line.append(f"  {failure.destination}", style="red")
            line.append(f"  {failure.label} (0x{failure.reply:02x})  ")
            line.append(failure.reason, style="dim")
            lines.append(line)
        return Group(*lines)

    def _totals(self) -> RenderableType:
        s = self.stats
        text = Text.assemble(
            ("served ", "dim"),
            str(s.served),
            ("  failed ", "dim"),
            str(s.failed),
            ("  open ", "dim"),
            str(len(s.open)),
            ("  up ", "dim"),
            human_bytes(s.bytes_up),
            ("  down ", "dim"),
            human_bytes(s.bytes_down),
            ("  now ", "dim"),
            f"{human_bytes(s.rate)}/s",
        )
        if s.local_dns_requests:
            text.append(f"  local DNS {s.local_dns_requests}", style="yellow")
        text.no_wrap = True
        text.overflow = "ellipsis"
        return text

"""Renderers: they consume events and never touch the core.

* :class:`tunnel.live.LiveRenderer` (its own module, so rich is imported only when a
  terminal shows it): the rich live view.
* :class:`PlainRenderer`: one timestamped line per event on stderr (logs, journald).
* :class:`JsonRenderer`: one JSON object per line on stdout, ``ready`` first.
* :class:`TerminalPrompter`: questions on the controlling terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from . import events
from .names import printable
from .platform import posix_module
from .stats import is_public_address


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
    "socks5-bind": "SOCKS5 BIND",
    "socks4-bind": "SOCKS4 BIND",
    "socks5-udp": "SOCKS5 UDP",
}


def listener_text(listener: events.Listener) -> str:
    """A listener's URL; one of -R's says it is on the server."""
    return f"{listener.url} (on the server)" if listener.remote else listener.url


def protocol_label(protocol: str) -> str:
    return _PROTOCOL_LABELS.get(protocol, protocol)


def destination(info: events.ConnectionInfo) -> str:
    host = f"[{info.host}]" if ":" in info.host else info.host
    return f"{host}:{info.port}"


# What each cause of a reconnect is called in a line.
_CAUSES = {
    events.CAUSE_LOST: "lost",
    events.CAUSE_SLEEP: "resumed from sleep",
    events.CAUSE_NETWORK: "the network changed",
    events.CAUSE_SIGHUP: "SIGHUP",
}


def status_line(status: events.Status) -> str:
    """SIGUSR1's line: the session's state and for how long, then the counters."""
    reconnects = f"{status.reconnects} reconnect{'s' if status.reconnects != 1 else ''}"
    return (
        f"status: {status.server} {status.state} for {human_seconds(status.state_seconds)}, "
        f"{status.open} open, {status.served} served, {status.failed} failed, "
        f"{status.rejected} rejected, {human_bytes(status.bytes_up)} up, "
        f"{human_bytes(status.bytes_down)} down, {reconnects}, "
        f"running {human_seconds(status.uptime)}"
    )


def describe(event: events.Event) -> tuple[str, bool] | None:
    """One line of text for an event, and whether it reports a problem; None for events
    that are only worth a line in JSON. The line is safe to show: names, user names and
    the server's reasons come from the network, and their control characters are
    escaped here (:func:`tunnel.names.printable`), once, for every text renderer."""
    described = _describe(event)
    if described is None:
        return None
    text = described[0]
    session_event = (
        events.SessionConnecting | events.SessionUp | events.SessionLost
    ) | events.ReconnectScheduled
    if isinstance(event, session_event) and event.upstream:
        text = f"route {event.upstream}: {text}"  # not the command line's session
    return printable(text), described[1]


def _describe(event: events.Event) -> tuple[str, bool] | None:
    match event:
        case events.ListenerStarted(listener=listener):
            return f"listening on {listener_text(listener)}", False
        case events.Ready(listeners=listeners, transport="openssh-master", master_pid=pid):
            where = " ".join(listener_text(item) for item in listeners)
            return f"ready: {where} (through the OpenSSH master, pid {pid})", False
        case events.Ready(listeners=listeners):
            return "ready: " + " ".join(listener_text(item) for item in listeners), False
        case events.SessionConnecting(server=server, attempt=attempt):
            again = f" (attempt {attempt})" if attempt > 1 else ""
            return f"connecting to {server}{again}", False
        case events.SessionUp(
            server=server, server_version=version, cipher=cipher, cause=cause, outage=outage
        ):
            back = ""
            if outage is not None:
                why = _CAUSES.get(cause or "", cause)
                back = f", back after {human_seconds(outage)} ({why})"
            # Through an OpenSSH master the cipher is the master's, and not told.
            what = ", ".join(part for part in (version, cipher) if part)
            return f"connected to {server} ({what}){back}", False
        case events.SessionLost(server=server, cause=cause) if cause != events.CAUSE_LOST:
            return f"reconnecting to {server} now: {_CAUSES.get(cause, cause)}", False
        case events.SessionLost(server=server, reason=reason):
            return f"lost {server}: {reason}", True
        case events.Status() as status:
            return status_line(status), False
        case events.ReconnectScheduled(delay=delay, attempt=attempt, reason=reason):
            return f"reconnecting in {delay:.1f} s (attempt {attempt}): {reason}", True
        case events.SessionProbed(server=server, cause=cause, answered=answered):
            why = _CAUSES.get(cause, cause)
            if answered:
                return f"{why}: {server} still answers", False
            return f"{why}: {server} did not answer, reconnecting now", True
        case events.ClientRejected(connection=info, empty=True):
            # A port probe or a browser's spare preconnect: worth a line, not a warning.
            return f"#{info.id} {info.client} closed without sending a request", False
        case events.ClientRejected(connection=info, reason=reason):
            return f"#{info.id} {info.client} rejected: {reason}", True
        case events.ChannelOpened(connection=info, latency=latency):
            return (
                f"#{info.id} {info.client} -> {destination(info)} "
                f"{protocol_label(info.protocol)} opened in {human_seconds(latency)}",
                False,
            )
        case events.ChannelFailed(connection=info, reply=reply, reply_label=label, reason=why):
            return (
                f"#{info.id} {info.client} -> {destination(info)} "
                f"failed: {label} (0x{reply:02x}): {why}",
                True,
            )
        case events.ConnectionClosed(connection=info, bytes_up=up, bytes_down=down, duration=d):
            dropped = f", {info.dropped} datagrams dropped" if info.dropped else ""
            return (
                f"#{info.id} {destination(info)} closed: {human_bytes(up)} up, "
                f"{human_bytes(down)} down{dropped}, {human_seconds(d)}",
                False,
            )
        case events.DatagramsDropped(connection=info, reason=why, destination=where):
            return (f"#{info.id} UDP datagram to {where} dropped: {why}", True)
        case events.IncomingRefused(listen_host=host, listen_port=port, client=client, reason=why):
            where = f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
            return f"{client} -> {where} (on the server) refused: {why}", True
        case events.IsolatedSession(isolation=key, server=server, state=state, reason=why):
            why = f": {why}" if why else ""
            return f'{server} for user "{key}": {state}{why}', state in ("failed", "lost")
        case events.Stopping(reason=reason):
            return f"stopping: {reason}", False
        case events.Notice(message=message):
            return message, True
    return None


# Per-connection facts come by the thousand on a busy tunnel: their lines are gathered
# and written once per pass of the event loop. Everything else (ready, the session,
# stopping) is written at once, so readiness is never late and -f never loses a line.
_BATCHED = (
    events.ClientAccepted,
    events.RequestParsed,
    events.ChannelOpened,
    events.ChannelFailed,
    events.ConnectionClosed,
    events.ClientRejected,
    events.DatagramsDropped,
    events.IncomingRefused,
)

# Facts that :func:`describe` gives no line, and lines it never marks as a problem (so
# -q never shows them): a renderer need not describe them to know.
_NO_LINE = (events.ClientAccepted, events.RequestParsed)
_NEVER_A_PROBLEM = (events.ChannelOpened, events.ConnectionClosed)


class LineWriter:
    """Lines to a stream, each batch of per-connection lines in one write and flush."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._pending: list[str] = []

    def write(self, line: str, *, batch: bool) -> None:
        self._pending.append(line)
        if len(self._pending) > 1:
            return  # a flush is already on its way
        if batch:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                return
            except RuntimeError:
                pass  # no loop: write now
        self.flush()

    def flush(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self.stream.write(text)
            self.stream.flush()


TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S"  # the event lines' time, local; -v log lines use it too


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
        self.out = LineWriter(self.stream)

    def __call__(self, event: events.Event) -> None:
        batch = isinstance(event, _BATCHED)
        if self.hint.check(event):
            self._line(DNS_HINT, batch)
        if isinstance(event, _NO_LINE) or (self.quiet and isinstance(event, _NEVER_A_PROBLEM)):
            return  # the common per-connection case, told without describing it
        described = describe(event)
        if described is None:
            return
        text, problem = described
        # SIGUSR1's line was asked for: -q does not hide it.
        if self.quiet and not problem and not isinstance(event, events.Status):
            return
        self._line(text, batch)

    def _line(self, text: str, batch: bool) -> None:
        stamp = time.strftime(TIMESTAMP_FORMAT, time.localtime(self.clock()))
        self.out.write(f"{stamp} {text}\n", batch=batch)

    def flush(self) -> None:
        self.out.flush()


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


_LAYOUTS: dict[type, tuple[str, tuple[str, ...]]] = {}


def _layout(kind: type) -> tuple[str, tuple[str, ...]]:
    """An event type's JSON name and its field names, worked out once per type."""
    layout = _LAYOUTS.get(kind)
    if layout is None:
        names = tuple(field.name for field in dataclasses.fields(kind))
        layout = _LAYOUTS[kind] = (_snake(kind.__name__), names)
    return layout


def event_record(event: events.Event, now: float) -> dict[str, Any]:
    """The JSON object for one event: ``event`` and ``time`` first, then its fields,
    with a connection flattened to ``id``, ``client``, and ``host``, ``port`` once a
    request named them (a field not known yet is left out, never sent empty). The
    README's ``--json`` table is the schema; the unit tests hold this to it."""
    name, fields = _layout(type(event))
    record: dict[str, Any] = {"event": name, "time": round(now, 6)}
    for field in fields:
        value = getattr(event, field)
        if isinstance(value, events.ConnectionInfo):
            record.update(id=value.id, client=value.client)
            if value.protocol:  # set with host and port when the request is read
                record.update(host=value.host, port=value.port)
            if value.isolation is not None:
                record["isolation"] = value.isolation
            # Only where it means something: the association's own count.
            if isinstance(event, events.DatagramsDropped) or (
                isinstance(event, events.ConnectionClosed) and value.dropped
            ):
                record["dropped"] = value.dropped
            if value.upstream:  # known once the request is routed
                record["upstream"] = value.upstream
        elif isinstance(value, events.Listener):
            record.update(host=value.host, port=value.port, url=value.url, remote=value.remote)
        elif isinstance(value, tuple) and value and isinstance(value[0], events.Listener):
            record[field] = [
                {"host": item.host, "port": item.port, "url": item.url, "remote": item.remote}
                for item in value
            ]
        elif isinstance(event, events.SessionUp) and field == "kex" and not value:
            continue  # asyncssh tells it only where the fast path records it
        elif field == "upstream" and not value:
            continue  # the command line's own session: its events name no route
        elif value is None:
            continue  # not known, or not meant here (session_up's outage before a loss, ready's
            # master_pid without a master)
        else:
            record[field] = value
    return record


def error_record(message: str, exit_status: int, now: float) -> dict[str, Any]:
    """The last JSON line of a run that failed to start (or failed for good)."""
    return {"event": "error", "time": round(now, 6), "message": message, "exit_status": exit_status}


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
        self.out = LineWriter(self.stream)

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
        self.write(record, batch=isinstance(event, _BATCHED))

    def write(self, record: dict[str, Any], *, batch: bool = False) -> None:
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n", batch=batch)

    def flush(self) -> None:
        self.out.flush()


class Tee:
    """Send every event to several renderers."""

    def __init__(self, *sinks: events.Sink) -> None:
        self.sinks = sinks

    def __call__(self, event: events.Event) -> None:
        for sink in self.sinks:
            sink(event)

    def flush(self) -> None:
        """Write what renderers still hold (at exit, when no loop pass will come)."""
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if flush is not None:
                flush()


class TerminalPrompter:
    """Asks on the controlling terminal (``/dev/tty``), as ssh does, so prompts work
    even when stdout and stderr are redirected. Secrets are read with echo off.

    ``ask`` blocks, so the session runs it in a thread of its own; ``pause`` and
    ``resume`` (the live view's hooks) and ``interrupt`` are called from the event loop."""

    def __init__(self, tty: TextIO) -> None:
        self.tty = tty
        self.before_prompt: Callable[[], None] = lambda: None
        self.after_prompt: Callable[[], None] = lambda: None
        self._echo_restore: list[Any] | None = None

    @classmethod
    def open(cls) -> TerminalPrompter | None:
        try:
            # A terminal cannot seek, so open() in "r+" text mode refuses it: wrap the raw
            # file by hand, writing through so prompts show before we wait for input.
            raw = io.FileIO("/dev/tty", "r+")
        except OSError:
            return None
        return cls(io.TextIOWrapper(raw, encoding="utf-8", errors="replace", write_through=True))

    def pause(self) -> None:
        self.before_prompt()

    def resume(self) -> None:
        self.after_prompt()

    def show(self, text: str) -> None:
        """Show the server's text (its auth banner): its lines, none of its controls."""
        self.pause()
        try:
            self.tty.write(printable(text.rstrip("\n"), keep="\n\t") + "\n")
            self.tty.flush()
        finally:
            self.resume()

    def ask(self, prompt: str, echo: bool) -> str | None:
        try:
            line = self._read_line(prompt) if echo else self._read_secret(prompt)
            return None if not line else line.rstrip("\r\n")
        except (OSError, EOFError, KeyboardInterrupt):
            return None

    def interrupt(self) -> None:
        """The question was abandoned (Ctrl-C): give the terminal its echo back."""
        restore, self._echo_restore = self._echo_restore, None
        termios = posix_module("termios")
        # termios.error is not an OSError: a terminal gone away raises either.
        errors: tuple[type[Exception], ...] = (OSError,)
        if termios is not None:
            errors += (termios.error,)
        with contextlib.suppress(*errors):
            if restore is not None and termios is not None:
                termios.tcsetattr(self.tty.fileno(), termios.TCSADRAIN, restore)
            self.tty.write("\n")
            self.tty.flush()

    def _read_line(self, prompt: str) -> str:
        # Keyboard-interactive prompts are the server's text too.
        self.tty.write(printable(prompt, keep="\n\t"))
        self.tty.flush()
        return self.tty.readline()

    def _read_secret(self, prompt: str) -> str:
        """Echo goes off before the prompt shows, so nothing typed early is echoed.
        Without termios (Windows) a secret is not asked at all: it would show."""
        termios = posix_module("termios")
        if termios is None:
            raise EOFError("no way to turn echo off on this terminal")
        fd = self.tty.fileno()
        old = termios.tcgetattr(fd)
        new = termios.tcgetattr(fd)
        new[3] &= ~termios.ECHO
        self._echo_restore = old
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, new)
            line = self._read_line(prompt)
        finally:
            if self._echo_restore is not None:
                self._echo_restore = None
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

"""The live status view on a terminal (rich). Kept apart from :mod:`tunnel.ui` so that
a tunnel without a terminal never imports rich (a few MiB of resident memory)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Sequence

from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.control import Control
from rich.live import Live
from rich.text import Text

from . import events
from .names import printable
from .platform import RawKeys, on_signals
from .stats import Stats
from .ui import (
    DNS_HINT,
    DnsLeakHint,
    describe,
    destination,
    human_bytes,
    human_seconds,
    listener_text,
    protocol_label,
)


class LiveRenderer:
    """The terminal view: a header with the session and listeners, a table of open
    connections sized to the terminal, the last failures and the totals. Redrawn at most
    four times a second by a timer on the event loop (no thread reads the counters while
    the relay writes them); log lines and prompts are printed above it.

    While it runs it owns the terminal: typed keys are not echoed into it, ``q`` quits
    (``on_quit``), and a resize clears the screen and redraws, since the terminal has
    already reflowed the old frame into rows nobody can count. The terminal is given
    back by :meth:`stop` (and :meth:`pause`, for a prompt), whichever way the run ends."""

    REFRESH = 0.25

    def __init__(
        self,
        console: Console,
        server: str,
        *,
        clock: Callable[[], float],
        on_quit: Callable[[], None] | None = None,
        keys: int | None = None,
    ) -> None:
        self.console = console
        self.server = server
        self.clock = clock
        self.on_quit = on_quit
        # The terminal the keys come from (stdin, when it is one); None: no keys.
        self.keys_fd = keys
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
        self._raw: RawKeys | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        # Undoes the SIGWINCH handler while one is installed.
        self._unwatch: Callable[[], None] | None = None
        self._drawn_size: tuple[int, ...] = ()
        # The label of what no route matches (from "ready"): connections going there
        # need no "way" column.
        self._default_way = ""

    def __call__(self, event: events.Event) -> None:
        now = self.clock()
        self.stats.apply(event, now)
        if isinstance(event, events.Ready):
            self.server = event.server
            self._default_way = event.upstream
        elif isinstance(event, events.SessionConnecting) and not event.upstream:
            self.server = event.server
        if self.hint.check(event):
            self.console.print(Text(DNS_HINT, style="yellow"))
        if isinstance(event, events.Stopping):
            self.stop()
            return
        if self._stopped:
            return
        if not self._running:
            self.start()
        if isinstance(
            event,
            events.Notice
            | events.SessionLost
            | events.ReconnectScheduled
            | events.SessionProbed
            | events.DatagramsDropped
            | events.IncomingRefused
            | events.Status,
        ) or (
            (isinstance(event, events.SessionUp) and event.outage is not None)
            or (isinstance(event, events.IsolatedSession) and event.state in ("failed", "lost"))
        ):
            described = describe(event)
            if described is not None:
                # A Text, not a markup string: "[bold]" in a server's message is text.
                self.console.print(Text(described[0], style="yellow"))

    def start(self) -> None:
        if self._running or self._stopped:
            return
        self._running = True
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        self._take_terminal()
        self._drawn_size = tuple(self.console.size)
        self.live.start(refresh=True)
        self._watch_resize()
        self._schedule()

    def pause(self) -> None:
        """Hand the terminal to a prompt, as it was before the view took it."""
        if self._running:
            self.live.stop()
            self._give_terminal_back()

    def resume(self) -> None:
        if self._running and not self._stopped:
            self._take_terminal()
            self.live.start(refresh=True)

    # -- the terminal: keys, echo, size ------------------------------------------------

    def _take_terminal(self) -> None:
        """Echo and line editing off, and ``q`` read as it is typed. Only with a loop to
        read on, a terminal to read from and termios to set it (not on Windows)."""
        if self.keys_fd is None or self._loop is None or self._raw is not None:
            return
        raw = RawKeys(self.keys_fd).__enter__()
        if not raw.active:
            return
        self._raw = raw
        try:
            self._loop.add_reader(self.keys_fd, self._key)
        except (NotImplementedError, OSError, ValueError):
            # Echo stays off all the same: typing must not draw into the view.
            return
        self._reading = True

    def _give_terminal_back(self) -> None:
        if self._reading and self._loop is not None and self.keys_fd is not None:
            self._reading = False
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.keys_fd)
        raw, self._raw = self._raw, None
        if raw is not None:
            raw.restore()

    def _key(self) -> None:
        assert self.keys_fd is not None
        try:
            typed = os.read(self.keys_fd, 256)
        except OSError:
            typed = b""
        if not typed:
            # The terminal went away: stop reading it (the loop would spin on it).
            self._give_terminal_back()
            return
        if (b"q" in typed or b"Q" in typed) and self.on_quit is not None:
            self.on_quit()

    def _watch_resize(self) -> None:
        winch = getattr(signal, "SIGWINCH", None)
        if winch is None or self._loop is None or self._unwatch is not None:
            return
        try:
            self._unwatch = on_signals(self._loop, [winch], lambda _signum: self._resized())
        except (RuntimeError, ValueError):
            return  # not the main thread: frames keep their size

    def _unwatch_resize(self) -> None:
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            with contextlib.suppress(Exception):
                unwatch()

    def _resized(self) -> None:
        """The terminal reflowed the last frame (or cut it) to its new width: rich can
        no longer find the frame's top to erase it. Clear the screen and draw again."""
        if self._stopped or not self.live.is_started:
            return
        size = tuple(self.console.size)
        if size == self._drawn_size:
            return  # a SIGWINCH without a change (a terminal re-attached): nothing moved
        self._drawn_size = size
        self.console.control(Control.clear(), Control.home())
        self.live.refresh()

    # -- drawing on a timer --------------------------------------------------------------

    def _schedule(self) -> None:
        if self._loop is None:
            return
        self._timer = self._loop.call_later(self.REFRESH, self._tick)

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

    def stop(self, *, summary: bool = True) -> None:
        """Restore the terminal; print the summary unless the tunnel never ran. Safe to
        call more than once and from any exit path."""
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        self._unwatch_resize()
        try:
            if self._running and self.live.is_started:
                self.live.stop()
        finally:
            self._give_terminal_back()
        if summary:
            self.console.print(self.summary())

    def summary(self) -> RenderableType:
        s = self.stats
        lines = Text()
        lines.append(f"pytunnel {self.server}", style="bold")
        lines.append(f" ran {human_seconds(self.clock() - self.started)}: ")
        lines.append(f"{s.served} served, {s.failed} failed, {s.rejected} rejected, ")
        if s.unused:
            lines.append(f"{s.unused} closed unused, ")
        lines.append(f"{human_bytes(s.bytes_up)} up, {human_bytes(s.bytes_down)} down")
        if s.local_dns_requests:
            lines.append(f", {s.local_dns_requests} resolved locally (DNS leak)")
        return lines

    # -- drawing ---------------------------------------------------------------------

    def render(self) -> RenderableType:
        now = self.clock()
        width, height = self.console.size
        failures = self._failures(width)
        totals = self._totals(width)
        # Header (2 lines), table heading, totals, the failures block, and a spare line
        # so the view never scrolls the terminal.
        used = 4 + len(totals) + (len(self.stats.failures) + 1 if failures is not None else 0)
        used += 1 if self.stats.ways else 0
        parts = [self._header(now, width), self._connections(now, max(1, height - used), width)]
        if failures is not None:
            parts.append(failures)
        parts.extend(totals)
        return Group(*parts)

    def _header(self, now: float, width: int) -> RenderableType:
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
        # Optional facts, least useful last: dropped whole when the line is too narrow,
        # never cut in the middle of a number.
        extras = [Text(f"  {s.cipher}", style="dim")] if s.cipher else []
        if s.server_version:
            # The server's own words, as it sent them in its identification string.
            extras.append(Text(f"  {printable(s.server_version)}", style="dim"))
        prefix = "pytunnel "
        room = width - cell_len(prefix) - 2 - state.cell_len
        server = shorten_left(self.server, max(room, 1))
        line = Text.assemble((prefix, "bold"), (server, "bold cyan"), "  ", state)
        for extra in extras:
            if line.cell_len + extra.cell_len > width:
                break
            line.append_text(extra)
        # One screen line each, whatever the width: the height budget counts on it.
        line.no_wrap = True
        line.overflow = "ellipsis"
        if not self.stats.ways:
            return Group(line, self._listening(width))
        return Group(line, self._listening(width), self._ways())

    def _ways(self) -> Text:
        """Each route destination and its state, one line."""
        colours = {"up": "green", "connecting": "yellow", "reconnecting": "yellow"}
        line = Text("routes: ", style="dim", no_wrap=True, overflow="ellipsis")
        for index, (label, state) in enumerate(self.stats.ways.items()):
            line.append(("  " if index else "") + printable(label), style="bold")
            line.append(f" ● {state}", style=colours.get(state, "red"))
        return line

    def _listening(self, width: int) -> Text:
        """The listeners' URLs, each whole or not at all ("+N more"); the label goes
        first when the terminal is too narrow for it."""
        urls = [listener_text(item) for item in self.stats.listeners]
        if not urls:
            return Text.assemble(("listening: ", "dim"), ("-", "bold"), no_wrap=True)
        for label in ("listening: ", ""):
            line = Text(label, style="dim", no_wrap=True, overflow="ellipsis")
            shown = 0
            for index, url in enumerate(urls):
                rest = len(urls) - index - 1
                piece = ("  " if shown else "") + url
                more = f"  +{rest} more" if rest else ""
                if shown and line.cell_len + cell_len(piece + more) > width:
                    break
                line.append(piece, style="bold")
                shown += 1
            if shown < len(urls):
                line.append(f"  +{len(urls) - shown} more", style="dim")
            if line.cell_len <= width:
                break
        return line

    def _connections(self, now: float, rows: int, width: int) -> RenderableType:
        open_now = sorted(self.stats.open.values(), key=lambda info: info.id, reverse=True)
        if not open_now:
            return Text("no open connections", style="dim")
        shown = open_now[:rows]
        cells: dict[str, list[str]] = {
            "#": [str(info.id) for info in shown],
            "client": [printable(info.client) for info in shown],
            "destination": [printable(destination(info)) for info in shown],
            "via": [protocol_label(info.protocol) for info in shown],
            "way": [printable(info.upstream) for info in shown],
            "age": [human_seconds(now - info.started) for info in shown],
            "up": [human_bytes(info.bytes_up) for info in shown],
            "down": [human_bytes(info.bytes_down) for info in shown],
            "rate": [_rate(self._conn_rates.get(info.id, 0.0)) for info in shown],
        }
        if all(info.upstream in ("", self._default_way) for info in shown):
            del cells["way"]  # no routes in play: one way out, said in the header
        more = len(open_now) - len(shown)
        columns = fit_columns(cells, width)
        lines = [_table_line(columns, None, style="bold dim")]
        lines += [_table_line(columns, row) for row in range(len(shown))]
        if more:
            lines.append(Text(f"+{more} more", style="dim"))
        return Group(*lines)

    def _failures(self, width: int) -> RenderableType | None:
        failures = list(self.stats.failures)
        if not failures:
            return None
        lines = [Text("last failures:", style="bold dim")]
        for failure in failures:
            line = Text(no_wrap=True, overflow="ellipsis")
            # The destination keeps its port; the server's reason is what gets cut.
            where = shorten_left(printable(failure.destination), max(8, width // 2))
            line.append(f"  {where}", style="red")
            code = f"  {failure.label} (0x{failure.reply:02x})"
            if line.cell_len + cell_len(code) > width:
                code = f"  0x{failure.reply:02x}"  # the code whole, not its label cut
            line.append(code)
            line.append(f"  {printable(failure.reason)}", style="dim")
            lines.append(line)
        return Group(*lines)

    def _totals(self, width: int) -> list[Text]:
        """The totals as lines of whole items: a narrow terminal gets more lines, never
        a number without its unit."""
        s = self.stats
        items: list[tuple[str, str, str]] = [
            ("served ", str(s.served), ""),
            ("failed ", str(s.failed), ""),
            ("open ", str(len(s.open)), ""),
            ("up ", human_bytes(s.bytes_up), ""),
            ("down ", human_bytes(s.bytes_down), ""),
            ("now ", f"{human_bytes(s.rate)}/s", ""),
        ]
        if s.unused:
            items.append(("unused ", str(s.unused), ""))
        if s.local_dns_requests:
            items.append(("local DNS ", str(s.local_dns_requests), "yellow"))
        if s.auth_failures:
            items.append(("bad logins ", str(s.auth_failures), "red"))
        if s.datagrams_dropped:
            items.append(("UDP dropped ", str(s.datagrams_dropped), "yellow"))
        lines: list[Text] = []
        line = Text(no_wrap=True, overflow="ellipsis")
        for label, value, style in items:
            gap = "  " if line.cell_len else ""
            if line.cell_len and line.cell_len + cell_len(gap + label + value) > width:
                lines.append(line)
                line, gap = Text(no_wrap=True, overflow="ellipsis"), ""
            line.append(gap)
            if style:
                line.append(label + value, style=style)
            else:
                line.append(label, style="dim")
                line.append(value)
        lines.append(line)
        return lines


def _rate(rate: float) -> str:
    return f"{human_bytes(rate)}/s" if rate else ""


# -- fitting the table to the terminal -------------------------------------------------

_GAP = 2
_RIGHT = frozenset({"#", "age", "up", "down", "rate"})
# Dropped in this order when the terminal is too narrow for everything: who connected
# and how matter less than where to and how much; the rate is last (the totals have it).
_DROP_FIRST = ("client", "via", "age")
_DROP_LAST = ("rate", "way")


def shorten_left(text: str, width: int) -> str:
    """``text`` in at most ``width`` cells, cut at the left with an ellipsis: the end of
    a destination (its port, its domain) is the part worth keeping."""
    if cell_len(text) <= width:
        return text
    kept = ""
    for char in reversed(text):
        if cell_len(char + kept) > width - 1:
            break
        kept = char + kept
    return "…" + kept


def _port_cells(text: str) -> int:
    """Cells a destination needs to keep its port: ":443" and one character before."""
    host, sep, port = text.rpartition(":")
    return cell_len(sep + port) + 2 if sep and host else cell_len(text)


def fit_columns(cells: dict[str, list[str]], width: int) -> list[tuple[str, int, list[str]]]:
    """The columns to draw at ``width`` cells, with their widths and cells: whole when
    everything fits; otherwise the least useful columns go first, then destinations are
    cut at the left (never their port), then the rate column goes. Numbers are never
    cut, so a column either shows whole values or is not there."""
    names = list(cells)

    def natural(name: str) -> int:
        return max(cell_len(name), *(cell_len(value) for value in cells[name]))

    def others(chosen: Sequence[str]) -> int:
        return sum(natural(n) for n in chosen if n != "destination") + _GAP * (len(chosen) - 1)

    dest_need = natural("destination")
    dest_min = max(cell_len("dest"), *(_port_cells(v) for v in cells["destination"]))
    chosen = names
    for drop in _DROP_FIRST:
        if others(chosen) + dest_need <= width:
            break
        chosen = [n for n in chosen if n != drop]
    for drop in _DROP_LAST:
        if others(chosen) + dest_min <= width:
            break
        chosen = [n for n in chosen if n != drop]
    dest_width = max(dest_min, min(dest_need, width - others(chosen)))
    columns = []
    for name in chosen:
        if name == "destination":
            title = name if dest_width >= cell_len(name) else "dest"
            values = [shorten_left(v, dest_width) for v in cells[name]]
            columns.append((title, dest_width, values))
        else:
            columns.append((name, natural(name), cells[name]))
    return columns


def _table_line(
    columns: list[tuple[str, int, list[str]]], row: int | None, style: str = ""
) -> Text:
    line = Text(no_wrap=True, overflow="crop", style=style)
    for index, (name, width, values) in enumerate(columns):
        value = name if row is None else values[row]
        pad = " " * max(0, width - cell_len(value))
        if index:
            line.append(" " * _GAP)
        # Text, not markup: names and reasons come from the network.
        line.append(pad + value if name in _RIGHT else value + pad)
    line.rstrip()
    return line

"""The live status view on a terminal (rich). Kept apart from :mod:`tunnel.ui` so that
a tunnel without a terminal never imports rich (a few MiB of resident memory)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import events
from .names import printable
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
            | events.DatagramsDropped
            | events.IncomingRefused,
        ):
            described = describe(event)
            if described is not None:
                # A Text, not a markup string: "[bold]" in a server's message is text.
                self.console.print(Text(described[0], style="yellow"))

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

    def stop(self, *, summary: bool = True) -> None:
        """Restore the terminal; print the summary unless the tunnel never ran."""
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        if self._running:
            self.live.stop()
        if summary:
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
            # The server's own words, as it sent them in its identification string.
            line.append(f"  {printable(s.server_version)}", style="dim")
        urls = Text("listening: ", style="dim", no_wrap=True, overflow="ellipsis")
        urls.append("  ".join(listener_text(item) for item in s.listeners) or "-", style="bold")
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
            # Text cells: a plain str cell would be read as rich markup.
            table.add_row(
                str(info.id),
                Text(info.client),
                Text(printable(destination(info))),
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
            line.append(f"  {printable(failure.destination)}", style="red")
            line.append(f"  {failure.label} (0x{failure.reply:02x})  ")
            line.append(printable(failure.reason), style="dim")
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
        if s.auth_failures:
            text.append(f"  bad logins {s.auth_failures}", style="red")
        if s.datagrams_dropped:
            text.append(f"  UDP dropped {s.datagrams_dropped}", style="yellow")
        text.no_wrap = True
        text.overflow = "ellipsis"
        return text

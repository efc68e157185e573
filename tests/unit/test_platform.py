"""Portability: pytunnel's rooms load and run where POSIX-only modules and calls are
missing (Windows: no termios, no loop.add_signal_handler; macOS: no SOCK_CLOEXEC), each
absence simulated in-process; and the live view's hold on a real pseudo-terminal (echo
off, keys read, everything given back)."""

from __future__ import annotations

import asyncio
import importlib
import io
import os
import signal
import socket
import sys
import termios
from collections.abc import Iterator

import pytest
from rich.console import Console

from tunnel import events
from tunnel.platform import RawKeys, on_signals, posix_module


@pytest.fixture
def no_termios(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes "import termios" raise ImportError, as on Windows.
    monkeypatch.setitem(sys.modules, "termios", None)


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def echo_is_on(fd: int) -> bool:
    return bool(termios.tcgetattr(fd)[3] & termios.ECHO)


def test_the_renderers_import_without_termios(
    no_termios: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tunnel

    for name in ("tunnel.ui", "tunnel.live", "tunnel.cli"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        # The fresh imports rebind these on the package: put the old ones back after.
        short = name.rpartition(".")[2]
        if hasattr(tunnel, short):
            monkeypatch.setattr(tunnel, short, getattr(tunnel, short))
    ui = importlib.import_module("tunnel.ui")
    importlib.import_module("tunnel.live")
    importlib.import_module("tunnel.cli")
    assert posix_module("termios") is None
    # Without a way to hide a secret, none is asked for (it would show as typed).
    prompter = ui.TerminalPrompter(io.StringIO())
    assert prompter.ask("password: ", echo=False) is None
    prompter.interrupt()  # nothing to restore, and no error


def test_raw_keys_without_termios_change_nothing(no_termios: None, pty: tuple[int, int]) -> None:
    _, slave = pty
    with RawKeys(slave) as raw:
        assert not raw.active
    raw.restore()


def test_raw_keys_turn_echo_off_and_back(pty: tuple[int, int]) -> None:
    _, slave = pty
    assert echo_is_on(slave)
    with RawKeys(slave) as raw:
        assert raw.active
        assert not echo_is_on(slave)
        assert termios.tcgetattr(slave)[3] & termios.ISIG  # Ctrl-C is still SIGINT
    assert echo_is_on(slave)


def test_raw_keys_leave_the_terminal_alone_in_the_background(
    pty: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, slave = pty
    # Another process group owns the terminal (we were started with "&"): touching
    # its modes would stop us with SIGTTOU.
    monkeypatch.setattr(os, "tcgetpgrp", lambda fd: os.getpgrp() + 1)
    with RawKeys(slave) as raw:
        assert not raw.active
        assert echo_is_on(slave)


def test_raw_keys_on_something_not_a_terminal() -> None:
    read_end, write_end = os.pipe()
    try:
        with RawKeys(read_end) as raw:
            assert not raw.active
    finally:
        os.close(read_end)
        os.close(write_end)


class _NoSignalLoop(asyncio.SelectorEventLoop):
    """A loop without add_signal_handler, as Windows' loops are."""

    def add_signal_handler(self, sig: int, callback: object, *args: object) -> None:
        raise NotImplementedError

    def remove_signal_handler(self, sig: int) -> bool:
        raise NotImplementedError


@pytest.mark.parametrize("loop_kind", [asyncio.SelectorEventLoop, _NoSignalLoop])
def test_on_signals_delivers_on_the_loop_either_way(loop_kind: type) -> None:
    loop = loop_kind()
    before = signal.getsignal(signal.SIGUSR1)
    got: list[int] = []
    arrived = asyncio.Event()

    def handler(signum: int) -> None:
        got.append(signum)
        arrived.set()

    try:
        undo = on_signals(loop, [signal.SIGUSR1], handler)
        if loop_kind is _NoSignalLoop:
            assert signal.getsignal(signal.SIGUSR1) is not before  # the fallback's
        signal.raise_signal(signal.SIGUSR1)
        loop.run_until_complete(_until(arrived))
        assert got == [signal.SIGUSR1]
        undo()
        assert signal.getsignal(signal.SIGUSR1) == before
    finally:
        signal.signal(signal.SIGUSR1, before)
        loop.close()


async def _until(done: asyncio.Event) -> None:
    async with asyncio.timeout(30):
        await done.wait()


def test_the_notifier_needs_no_sock_cloexec(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    from tunnel.notify import SystemdNotifier

    monkeypatch.delattr(socket, "SOCK_CLOEXEC", raising=False)
    address = f"{tmp_path}/notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        notifier = SystemdNotifier(address)
        notifier(events.Stopping("bye"))
        assert listener.recv(4096).startswith(b"STOPPING=1\n")
        notifier.sock.close()


def test_background_without_fork_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tunnel import cli

    monkeypatch.delattr(os, "fork")
    with pytest.raises(SystemExit) as exited:
        cli.main(["-f", "-D", "1080", "host"])
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == "pytunnel: -f needs fork(), which this system lacks"


# -- the live view on a pseudo-terminal --------------------------------------------------


def _view(slave: int, quits: asyncio.Event) -> object:
    from tunnel.live import LiveRenderer

    console = Console(width=80, height=24, force_terminal=True, file=io.StringIO())
    return LiveRenderer(console, "h", clock=lambda: 0.0, on_quit=quits.set, keys=slave)


async def test_the_view_reads_q_with_echo_off_and_gives_the_terminal_back(
    pty: tuple[int, int],
) -> None:
    from tunnel.live import LiveRenderer

    master, slave = pty
    quits = asyncio.Event()
    view = _view(slave, quits)
    assert isinstance(view, LiveRenderer)
    try:
        view(events.ListenerStarted(events.Listener("127.0.0.1", 1080)))
        assert not echo_is_on(slave)
        os.write(master, b"x")
        # The view reads "x" (and ignores it) before "hello q": one loop pass each.
        await asyncio.sleep(0)
        assert not quits.is_set()
        os.write(master, b"hello q")
        await _until(quits)
        # Nothing typed was echoed back to the terminal.
        os.set_blocking(master, False)
        with pytest.raises(BlockingIOError):
            os.read(master, 1024)
        view.pause()  # a prompt: the terminal as it was
        assert echo_is_on(slave)
        view.resume()
        assert not echo_is_on(slave)
    finally:
        view.stop()
    assert echo_is_on(slave)


async def test_the_view_gives_the_terminal_back_when_rendering_fails(
    pty: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunnel.live import LiveRenderer

    _, slave = pty
    view = _view(slave, asyncio.Event())
    assert isinstance(view, LiveRenderer)
    view(events.ListenerStarted(events.Listener("127.0.0.1", 1080)))
    assert not echo_is_on(slave)

    def broken() -> None:
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(view.live, "stop", broken)
    with pytest.raises(RuntimeError):
        view.stop()
    assert echo_is_on(slave)


async def test_the_view_without_termios_starts_with_no_keys(
    no_termios: None, pty: tuple[int, int]
) -> None:
    _, slave = pty
    view = _view(slave, asyncio.Event())
    try:
        view(events.ListenerStarted(events.Listener("127.0.0.1", 1080)))  # type: ignore[operator]
        assert echo_is_on(slave)
    finally:
        view.stop()  # type: ignore[attr-defined]

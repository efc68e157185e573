"""ProxyCommand: the command ssh_config (or ``-o``) names to carry the SSH connection
over its stdin and stdout, run as ssh runs it, its stderr passed on as notices.

The session hands one end of the socket pair to asyncssh; this room knows nothing of
SSH.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from . import events
from .errors import ConnectFailed

log = logging.getLogger(__name__)

# How long a ProxyCommand gets to exit, or to finish its stderr, once the connection
# through it failed: long enough on a loaded machine, short enough not to hang a retry.
_EXIT_WAIT = 5.0
# The longest stderr line kept whole (a command writing without newlines is cut here).
_LINE_MAX = 4096
# Passes of the event loop a failed attempt waits for uvloop to close its descriptor.
_SETTLE_PASSES = 10


def _printable(text: str) -> str:
    """A line of someone else's output, safe to put on a terminal."""
    return "".join(ch if ch.isprintable() or ch == "\t" else "?" for ch in text)


class ProxyCommand:
    """A running ProxyCommand. The SSH connection speaks over its stdin and stdout (one
    end of a socket pair; the other end is handed to asyncssh). Its stderr is passed on
    line by line as notices, as ssh lets it through to the terminal, and the last line
    is kept to say why the command failed."""

    def __init__(
        self,
        template: str,
        process: asyncio.subprocess.Process,
        sock: socket.socket,
        emit: events.Sink,
    ) -> None:
        self.template = template
        self.process = process
        self.sock = sock
        # Which socket the descriptor is (its inode): see drop_socket.
        self._inode = os.fstat(sock.fileno()).st_ino
        self.emit = emit
        self.last_line = ""
        # Started by start(), stopped by stop() and awaited by wait_stopped().
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, template: str, command: str, emit: events.Sink) -> ProxyCommand:
        ours, theirs = socket.socketpair()
        # As ssh: the user's shell runs "exec COMMAND", so no shell lingers in between.
        shell = os.environ.get("SHELL") or "/bin/sh"
        log.info("running ProxyCommand: %s", command)
        try:
            process = await asyncio.create_subprocess_exec(
                shell,
                "-c",
                f"exec {command}",
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=asyncio.subprocess.PIPE,
                # Its own session: Ctrl-C on the terminal is ours to handle, not its.
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise ConnectFailed(
                f"cannot run ProxyCommand `{template}` with {shell}: {exc.strerror or exc}"
            ) from exc
        finally:
            theirs.close()
        proxy = cls(template, process, ours, emit)
        assert process.stderr is not None
        proxy._pump = asyncio.get_running_loop().create_task(proxy._read_stderr(process.stderr))
        return proxy

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        pending = b""
        while chunk := await stream.read(_LINE_MAX):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) >= _LINE_MAX:
                lines.append(pending)
                pending = b""
            for line in lines:
                self._line(line)
        self._line(pending)

    def _line(self, raw: bytes) -> None:
        text = _printable(raw.decode("utf-8", "replace").rstrip("\r")).rstrip()
        if text.strip():
            self.last_line = text.strip()
            self.emit(events.Notice(f"ProxyCommand: {text}", key="proxy-command"))

    async def failure(self) -> ConnectFailed | None:
        """Why the connection through this command failed, if the command ended (waiting
        a bounded time for it to): its exit status and the last line it wrote to stderr.
        None while it still runs: then the failure was the SSH connection's own."""
        try:
            status = await asyncio.wait_for(self.process.wait(), _EXIT_WAIT)
        except TimeoutError:
            return None
        if self._pump is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), _EXIT_WAIT)
        how = f"exited {status}" if status >= 0 else f"was killed by signal {-status}"
        if status == 0:
            how += " before the SSH connection was set up"
        said = f": {self.last_line}" if self.last_line else " (it wrote nothing to stderr)"
        return ConnectFailed(
            f"ProxyCommand `{self.template}` {how}{said}",
            hint="check the command: it must connect its stdin and stdout to the SSH "
            "server (as `nc %h %p` does)",
        )

    async def drop_socket(self) -> None:
        """After a failed attempt on our end of the command's socket. uvloop's transport
        closes the descriptor itself, but when the connection fails as it is made, it can
        leave this socket object holding the number of the closed descriptor, which the
        next socket made gets: closing the object then (when it is collected) would close
        that one. So: detach it once its descriptor is closed or is another socket's;
        close it only if it is still ours after the loop had time to close it."""
        for _ in range(_SETTLE_PASSES):
            if self.sock.fileno() == -1:
                return  # detached by uvloop: nothing of ours left
            if not self._still_ours():
                self.sock.detach()
                return
            await asyncio.sleep(0)
        self.sock.close()

    def _still_ours(self) -> bool:
        try:
            return os.fstat(self.sock.fileno()).st_ino == self._inode
        except OSError:
            return False

    def stop(self) -> None:
        """End the command (as ssh does when the connection is over) and its reader."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
        if self._pump is not None:
            self._pump.cancel()

    async def wait_stopped(self) -> None:
        self.stop()
        try:
            await asyncio.wait_for(self.process.wait(), _EXIT_WAIT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

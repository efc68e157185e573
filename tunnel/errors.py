"""Every error pytunnel knows, the reply each one earns, and the exit statuses.

The tree::

    TunnelError                      base; carries .exit_status
    ├── ConfigError                  bad option or value                       exit 2
    ├── ListenError                  could not bind a requested address        exit 3
    ├── SessionError                                                           exit 255
    │   ├── AuthenticationFailed     fatal, never retried
    │   ├── HostKeyRejected          fatal, never retried
    │   ├── ConnectFailed            retryable (refused, timeout, DNS, lost)
    │   ├── SessionClosed            retryable (server disconnect)
    │   └── OutageTooLong            --give-up-after ran out; never retried
    ├── CommandFailed                -- COMMAND could not start                 exit 126/127
    ├── ChannelOpenFailed(reason)    one request; never fatal
    ├── RemoteCommandEnded           a program on the server ended (the UDP helper)
    └── SOCKSError
        ├── RemoteProtocolError      the client broke the protocol (carries the reply to send)
        └── LocalProtocolError       we misused the codec: a bug

Foreign exceptions (asyncssh, OSError) are translated once, in the room that meets
them, and chained with ``raise ... from exc``.
"""

from __future__ import annotations

import enum
import re


class ExitStatus(enum.IntEnum):
    """Process exit statuses, as ssh(1) users expect them."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    LISTEN = 3
    INTERRUPTED = 130
    SSH = 255


class ReplyReason(enum.IntEnum):
    """Why a request succeeded or failed, named and numbered as RFC 1928 section 6 REP.

    SOCKS4 has one failure code (91); :func:`socks4_code` folds these onto it.
    """

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    CONNECTION_NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    ReplyReason.SUCCEEDED: "succeeded",
    ReplyReason.GENERAL_FAILURE: "general failure",
    ReplyReason.CONNECTION_NOT_ALLOWED: "connection not allowed",
    ReplyReason.NETWORK_UNREACHABLE: "network unreachable",
    ReplyReason.HOST_UNREACHABLE: "host unreachable",
    ReplyReason.CONNECTION_REFUSED: "connection refused",
    ReplyReason.TTL_EXPIRED: "timed out",
    ReplyReason.COMMAND_NOT_SUPPORTED: "command not supported",
    ReplyReason.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}


class OpenFailureCode(enum.IntEnum):
    """SSH_MSG_CHANNEL_OPEN_FAILURE reason codes, RFC 4254 section 5.1."""

    ADMINISTRATIVELY_PROHIBITED = 1
    CONNECT_FAILED = 2
    UNKNOWN_CHANNEL_TYPE = 3
    RESOURCE_SHORTAGE = 4


# OpenSSH sends strerror()/gai_strerror() text for CONNECT_FAILED, in the C locale of the
# server; other servers word it their own way. First match wins, case-insensitively.
_CONNECT_FAILED_TEXT: tuple[tuple[re.Pattern[str], ReplyReason], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), reason)
    for pattern, reason in (
        (r"refused", ReplyReason.CONNECTION_REFUSED),
        (r"network is unreachable|network unreachable", ReplyReason.NETWORK_UNREACHABLE),
        (r"timed out|timeout", ReplyReason.TTL_EXPIRED),
        (
            r"no route to host|host is unreachable|host unreachable|host is down"
            r"|name or service not known|nodename nor servname|name does not resolve"
            r"|no address associated|temporary failure in name resolution"
            r"|non-recoverable failure in name resolution|unknown host|not known",
            ReplyReason.HOST_UNREACHABLE,
        ),
    )
)


def classify_open_failure(code: int, text: str) -> ReplyReason:
    """Map an SSH channel-open failure to the SOCKS reply that tells the truth."""
    if code == OpenFailureCode.ADMINISTRATIVELY_PROHIBITED:
        return ReplyReason.CONNECTION_NOT_ALLOWED
    if code == OpenFailureCode.CONNECT_FAILED:
        for pattern, reason in _CONNECT_FAILED_TEXT:
            if pattern.search(text):
                return reason
    return ReplyReason.GENERAL_FAILURE


def socks4_code(reason: ReplyReason) -> int:
    """SOCKS4 CD: 90 granted, 91 rejected or failed (the only failure clients act on)."""
    return 90 if reason is ReplyReason.SUCCEEDED else 91


class TunnelError(Exception):
    """Base of every error pytunnel raises on purpose."""

    exit_status: ExitStatus = ExitStatus.FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} ({self.hint})"


class ConfigError(TunnelError):
    """A bad option or value: the user can fix it by changing the command or config."""

    exit_status = ExitStatus.USAGE


class ListenError(TunnelError):
    """A requested listening address could not be bound."""

    exit_status = ExitStatus.LISTEN


class SessionError(TunnelError):
    """The SSH session could not be set up or was lost."""

    exit_status = ExitStatus.SSH
    retryable = True


class AuthenticationFailed(SessionError):
    retryable = False


class HostKeyRejected(SessionError):
    retryable = False


class ConnectFailed(SessionError):
    retryable = True


class SessionClosed(SessionError):
    """A live session ended. ``reason`` is why, without the server's name."""

    retryable = True

    def __init__(self, server: str, reason: str) -> None:
        super().__init__(f"connection to {server} lost: {reason}")
        self.reason = reason


class OutageTooLong(SessionError):
    """``--give-up-after``: the session stayed down longer than that; ``reason`` is the
    last attempt's error."""

    retryable = False

    def __init__(self, server: str, limit: float, reason: str) -> None:
        super().__init__(
            f"gave up on {server}: down for {limit:g} s (--give-up-after); last: {reason}"
        )
        self.reason = reason


class CommandFailed(TunnelError):
    """The command after ``--`` could not be started; the status is a shell's: 127 when
    it does not exist, 126 when it cannot be run."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_status = status  # type: ignore[assignment]


class ChannelOpenFailed(TunnelError):
    """One forwarded connection could not be opened; never fatal for the tunnel."""

    def __init__(self, reason: ReplyReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        # The label of the way out that failed (a route's target), set by the router.
        self.upstream = ""


class RemoteCommandEnded(TunnelError):
    """A program we ran on the server ended: its exit status (None if it was killed or
    never started) and the last of what it wrote to stderr."""

    def __init__(self, status: int | None, stderr: str) -> None:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        how = f"exit status {status}" if status is not None else "no exit status"
        super().__init__(f"{how}: {detail}" if detail else how)
        self.status = status
        self.stderr = stderr


class SOCKSError(TunnelError):
    """Something went wrong in a SOCKS exchange."""


class RemoteProtocolError(SOCKSError):
    """The client broke the protocol. ``reply`` is what to send before closing (maybe
    nothing: RFC 1928 has no answer for a wrong version byte)."""

    def __init__(self, message: str, *, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class LocalProtocolError(SOCKSError):
    """We used the codec in a way its state does not allow: a bug in pytunnel."""

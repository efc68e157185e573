"""The exception tree, exit statuses, and the mapping from SSH channel-open failures to
honest SOCKS reply codes (DESIGN.md, "Honest SOCKS replies")."""

from __future__ import annotations

import pytest

from tunnel.errors import (
    AuthenticationFailed,
    ChannelOpenFailed,
    ConfigError,
    ConnectFailed,
    ExitStatus,
    HostKeyRejected,
    ListenError,
    LocalProtocolError,
    OpenFailureCode,
    RemoteProtocolError,
    ReplyReason,
    SessionClosed,
    SessionError,
    SOCKSError,
    TunnelError,
    classify_open_failure,
    socks4_code,
)

PROHIBITED = OpenFailureCode.ADMINISTRATIVELY_PROHIBITED
CONNECT_FAILED = OpenFailureCode.CONNECT_FAILED

CLASSIFY = [
    # (id, code, text, expected REP)
    ("prohibited-no-text", PROHIBITED, "", 0x02),
    ("prohibited-ignores-refused-text", PROHIBITED, "Connection refused", 0x02),
    ("prohibited-openssh-text", PROHIBITED, "administratively prohibited: open failed", 0x02),
    ("refused", CONNECT_FAILED, "Connection refused", 0x05),
    ("refused-lower", CONNECT_FAILED, "connection refused", 0x05),
    ("refused-upper", CONNECT_FAILED, "CONNECTION REFUSED", 0x05),
    ("refused-prefixed", CONNECT_FAILED, "connect failed: Connection refused", 0x05),
    ("net-unreachable", CONNECT_FAILED, "Network is unreachable", 0x03),
    ("net-unreachable-mixed-case", CONNECT_FAILED, "nEtWoRk Is UnReAcHaBlE", 0x03),
    ("no-route", CONNECT_FAILED, "No route to host", 0x04),
    ("no-route-lower", CONNECT_FAILED, "no route to host", 0x04),
    ("host-unreachable", CONNECT_FAILED, "Host is unreachable", 0x04),
    ("host-down", CONNECT_FAILED, "Host is down", 0x04),
    ("gai-not-known", CONNECT_FAILED, "Name or service not known", 0x04),
    ("gai-not-known-upper", CONNECT_FAILED, "NAME OR SERVICE NOT KNOWN", 0x04),
    ("gai-temporary", CONNECT_FAILED, "Temporary failure in name resolution", 0x04),
    ("gai-bsd", CONNECT_FAILED, "nodename nor servname provided, or not known", 0x04),
    ("gai-musl", CONNECT_FAILED, "Name does not resolve", 0x04),
    ("timed-out", CONNECT_FAILED, "Connection timed out", 0x06),
    ("timed-out-upper", CONNECT_FAILED, "CONNECTION TIMED OUT", 0x06),
    ("timed-out-bsd", CONNECT_FAILED, "Operation timed out", 0x06),
    ("timeout-word", CONNECT_FAILED, "connect timeout", 0x06),
    ("open-failed", CONNECT_FAILED, "open failed", 0x01),
    ("empty", CONNECT_FAILED, "", 0x01),
    ("reset", CONNECT_FAILED, "Connection reset by peer", 0x01),
    ("unknown-type-ignores-text", OpenFailureCode.UNKNOWN_CHANNEL_TYPE, "Connection refused", 0x01),
    ("unknown-type", OpenFailureCode.UNKNOWN_CHANNEL_TYPE, "unknown channel type", 0x01),
    ("resource-shortage", OpenFailureCode.RESOURCE_SHORTAGE, "", 0x01),
    ("resource-shortage-text", OpenFailureCode.RESOURCE_SHORTAGE, "Connection timed out", 0x01),
    ("code-as-plain-int", 2, "Connection refused", 0x05),
    ("code-out-of-range", 99, "Connection refused", 0x01),
]


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [row[1:] for row in CLASSIFY],
    ids=[row[0] for row in CLASSIFY],
)
def test_classify_open_failure(code: int, text: str, expected: int) -> None:
    reason = classify_open_failure(code, text)
    assert isinstance(reason, ReplyReason)
    assert reason == expected


def test_open_failure_codes_are_rfc_4254() -> None:
    assert [int(code) for code in OpenFailureCode] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("reason", "code"),
    [(reason, 90 if reason is ReplyReason.SUCCEEDED else 91) for reason in ReplyReason],
    ids=[reason.name for reason in ReplyReason],
)
def test_socks4_code(reason: ReplyReason, code: int) -> None:
    assert socks4_code(reason) == code


def test_reply_reasons_are_rfc_1928_rep_values() -> None:
    assert {reason.name: int(reason) for reason in ReplyReason} == {
        "SUCCEEDED": 0x00,
        "GENERAL_FAILURE": 0x01,
        "CONNECTION_NOT_ALLOWED": 0x02,
        "NETWORK_UNREACHABLE": 0x03,
        "HOST_UNREACHABLE": 0x04,
        "CONNECTION_REFUSED": 0x05,
        "TTL_EXPIRED": 0x06,
        "COMMAND_NOT_SUPPORTED": 0x07,
        "ADDRESS_TYPE_NOT_SUPPORTED": 0x08,
    }


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        (ReplyReason.SUCCEEDED, "succeeded"),
        (ReplyReason.GENERAL_FAILURE, "general failure"),
        (ReplyReason.CONNECTION_NOT_ALLOWED, "connection not allowed"),
        (ReplyReason.NETWORK_UNREACHABLE, "network unreachable"),
        (ReplyReason.HOST_UNREACHABLE, "host unreachable"),
        (ReplyReason.CONNECTION_REFUSED, "connection refused"),
        (ReplyReason.TTL_EXPIRED, "timed out"),
        (ReplyReason.COMMAND_NOT_SUPPORTED, "command not supported"),
        (ReplyReason.ADDRESS_TYPE_NOT_SUPPORTED, "address type not supported"),
    ],
    ids=lambda value: value.name if isinstance(value, ReplyReason) else None,
)
def test_reply_reason_labels(reason: ReplyReason, label: str) -> None:
    assert reason.label == label


# ---- exception tree ----

TREE = [
    # (class, parent, exit status)
    (ConfigError, TunnelError, 2),
    (ListenError, TunnelError, 3),
    (SessionError, TunnelError, 255),
    (AuthenticationFailed, SessionError, 255),
    (HostKeyRejected, SessionError, 255),
    (ConnectFailed, SessionError, 255),
    (SessionClosed, SessionError, 255),
    (ChannelOpenFailed, TunnelError, 1),
    (SOCKSError, TunnelError, 1),
    (RemoteProtocolError, SOCKSError, 1),
    (LocalProtocolError, SOCKSError, 1),
]


@pytest.mark.parametrize(
    ("cls", "parent", "status"), TREE, ids=[cls.__name__ for cls, _, _ in TREE]
)
def test_exception_tree_and_exit_status(
    cls: type[TunnelError], parent: type[TunnelError], status: int
) -> None:
    assert cls.__bases__ == (parent,)
    assert issubclass(cls, TunnelError)
    assert issubclass(TunnelError, Exception)
    assert cls.exit_status == status
    assert isinstance(cls.exit_status, ExitStatus)


def test_exit_statuses() -> None:
    assert {status.name: int(status) for status in ExitStatus} == {
        "OK": 0,
        "FAILURE": 1,
        "USAGE": 2,
        "LISTEN": 3,
        "INTERRUPTED": 130,
        "SSH": 255,
    }


@pytest.mark.parametrize(
    ("cls", "retryable"),
    [
        (SessionError, True),
        (AuthenticationFailed, False),
        (HostKeyRejected, False),
        (ConnectFailed, True),
        (SessionClosed, True),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else str(value),
)
def test_retryable(cls: type[SessionError], retryable: bool) -> None:
    assert cls.retryable is retryable
    instance = SessionClosed("user@host", "x") if cls is SessionClosed else cls("x")
    assert instance.retryable is retryable


def test_session_closed_names_the_server_once() -> None:
    error = SessionClosed("user@host:22", "Connection lost")
    assert error.reason == "Connection lost"
    assert str(error) == "connection to user@host:22 lost: Connection lost"


def test_str_without_hint() -> None:
    error = ConfigError("bad -D 'abc'")
    assert str(error) == "bad -D 'abc'"
    assert error.message == "bad -D 'abc'"
    assert error.hint is None
    assert error.args == ("bad -D 'abc'",)


def test_str_with_hint() -> None:
    error = ListenError("cannot listen on 127.0.0.1:1080", hint="is another proxy running?")
    assert str(error) == "cannot listen on 127.0.0.1:1080 (is another proxy running?)"
    assert error.message == "cannot listen on 127.0.0.1:1080"
    assert error.hint == "is another proxy running?"


def test_channel_open_failed_carries_reason() -> None:
    error = ChannelOpenFailed(ReplyReason.CONNECTION_REFUSED, "Connection refused")
    assert error.reason is ReplyReason.CONNECTION_REFUSED
    assert str(error) == "Connection refused"
    assert error.hint is None


def test_remote_protocol_error_reply() -> None:
    assert RemoteProtocolError("not SOCKS").reply == b""
    error = RemoteProtocolError("no method", reply=b"\x05\xff")
    assert error.reply == b"\x05\xff"
    assert str(error) == "no method"

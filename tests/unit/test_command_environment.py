"""What a wrapped command (``-- COMMAND``) finds in its environment when the proxy wants
a password: proxy URLs that carry user and password, percent-encoded so that any byte
survives, and no other copy of the password."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel import events
from tunnel.app import command_environment

LISTENERS = [events.Listener("127.0.0.1", 1080)]
SOCKS_VARIABLES = ("ALL_PROXY", "all_proxy")
HTTP_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")


def credentials_in(url: str) -> tuple[bytes, bytes]:
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    return unquote_to_bytes(user), unquote_to_bytes(password)


def test_urls_carry_the_credentials_percent_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTUNNEL_PROXY_PASSWORD", "p@ss:w/rd%41")
    env = command_environment(LISTENERS, (b"bob", b"p@ss:w/rd%41"))
    for name in SOCKS_VARIABLES:
        assert env[name] == "socks5h://bob:p%40ss%3Aw%2Frd%2541@127.0.0.1:1080"
    for name in HTTP_VARIABLES:
        assert env[name] == "http://bob:p%40ss%3Aw%2Frd%2541@127.0.0.1:1080"
    assert "PYTUNNEL_PROXY_PASSWORD" not in env


def test_without_credentials_the_urls_have_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTUNNEL_PROXY_PASSWORD", "unused")
    env = command_environment(LISTENERS)
    assert env["ALL_PROXY"] == "socks5h://127.0.0.1:1080"
    assert env["http_proxy"] == "http://127.0.0.1:1080"
    assert "PYTUNNEL_PROXY_PASSWORD" not in env


def test_only_remote_listeners_still_drop_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTUNNEL_PROXY_PASSWORD", "s3cret")
    env = command_environment([events.Listener("127.0.0.1", 1080, remote=True)], (b"u", b"s3cret"))
    assert "s3cret" not in "".join(env.values())


@given(
    user=st.binary(min_size=1, max_size=40).filter(lambda u: b":" not in u),
    password=st.binary(max_size=60),
)
def test_any_credentials_survive_the_url(user: bytes, password: bytes) -> None:
    env = command_environment([events.Listener("::1", 1080)], (user, password))
    for name in (*SOCKS_VARIABLES, *HTTP_VARIABLES):
        parts = urlsplit(env[name])
        assert (parts.hostname, parts.port) == ("::1", 1080)
        assert credentials_in(env[name]) == (user, password)

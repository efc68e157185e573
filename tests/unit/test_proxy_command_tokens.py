"""ProxyCommand's %-tokens, expanded as ssh expands them: %h %n %p %r and %%, any
other token an error, and no value with shell metacharacters put into the command."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.config import expand_proxy_command, parse_proxy_command
from tunnel.errors import ConfigError


def expand(template: str, **values: object) -> str:
    defaults: dict[str, object] = {
        "host": "real.example",
        "original_host": "alias",
        "port": 2222,
        "user": "carol",
    }
    return expand_proxy_command(template, **{**defaults, **values})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("nc %h %p", "nc real.example 2222"),
        ("ssh -W %h:%p %r@bastion", "ssh -W real.example:2222 carol@bastion"),
        ("connect %n", "connect alias"),
        ("printf 100%%", "printf 100%"),
        ("%%h is not a token", "%h is not a token"),
        ("%%%h", "%real.example"),
        ("%h%p%r", "real.example2222carol"),
        ("no tokens at all", "no tokens at all"),
    ],
)
def test_tokens(template: str, expected: str) -> None:
    assert expand(template) == expected


@pytest.mark.parametrize(
    "template", ["nc %x", "nc %u %p", "nc %C", "nc %d", "nc %k", "50%", "nc %h %"]
)
def test_other_tokens_are_refused(template: str) -> None:
    with pytest.raises(ConfigError) as caught:
        expand(template)
    assert "ProxyCommand" in caught.value.message
    assert caught.value.exit_status == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user", "x;touch /tmp/owned"),
        ("user", "$(id)"),
        ("user", "a b"),
        ("host", "host`id`"),
        ("original_host", "a|b"),
        ("user", "quote'd"),
        ("user", "new\nline"),
        ("user", "-oProxyCommand=id"),
    ],
)
def test_shell_metacharacters_are_never_substituted(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        expand("nc %h %p %r %n", **{field: value})
    assert "not safe" in caught.value.message


def test_unused_unsafe_values_do_not_matter() -> None:
    assert expand("nc %h %p", user="x;y") == "nc real.example 2222"


@given(st.text())
def test_escaped_text_comes_back_unchanged(text: str) -> None:
    assert expand(text.replace("%", "%%")) == text


@given(st.text(alphabet=st.characters(blacklist_characters="%")), st.sampled_from("hnpr"))
def test_a_token_between_plain_text(text: str, token: str) -> None:
    values = {"h": "real.example", "n": "alias", "p": "2222", "r": "carol"}
    assert expand(f"{text}%{token}{text}") == f"{text}{values[token]}{text}"


@pytest.mark.parametrize(("value", "expected"), [("none", "none"), ("NONE", "none"),
                                                 (" nc %h %p ", "nc %h %p")])  # fmt: skip
def test_parse_proxy_command(value: str, expected: str) -> None:
    assert parse_proxy_command(value) == expected


@pytest.mark.parametrize("value", ["", "   ", "nc %q"])
def test_parse_proxy_command_refuses(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_proxy_command(value)

"""One option table for ``-o KEY=VALUE`` and ssh_config: every key the table holds gives
the same Config whichever way it comes, a bad value is refused both ways, and the
ssh_config reader maps no key outside the table. No sockets: the files are read, and
nothing is connected to.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from asyncssh.config import SSHClientConfig

from tunnel.cli import build_config
from tunnel.config import OPTION_KEYS, Config, FromFile, OptionKey
from tunnel.errors import ConfigError
from tunnel.sshconfig import _FileConfig, apply_ssh_config, connect_target

# A value each key takes, unlike its default (so that the key visibly does something),
# and one it refuses (None where the key takes any text). A new row in the table needs
# one line here: the test below refuses a key without one.
SAMPLES: dict[str, tuple[str, str | None]] = {
    "StrictHostKeyChecking": ("accept-new", "maybe"),
    "UserKnownHostsFile": ("/kh/one /kh/two", None),
    "GlobalKnownHostsFile": ("/kh/global", None),
    "ConnectTimeout": ("4", "soon"),
    "Port": ("2222", "70000"),
    "User": ("alice", None),
    "IdentityFile": ("/keys/id_test", None),
    "DynamicForward": ("127.0.0.1:1080", "1080x"),
    "RemoteForward": ("2080", "[::1"),
    "ServerAliveInterval": ("7", "-1"),
    "ServerAliveCountMax": ("9", "0"),
    "HostName": ("real.example", "bad!host"),
    "IdentitiesOnly": ("yes", "maybe"),
    "ProxyJump": ("jump1,bob@jump2:2200", "a,,b"),
    "ProxyCommand": ("nc %h %p", "nc %x"),
    "BatchMode": ("yes", "sometimes"),
    "PubkeyAuthentication": ("no", "perhaps"),
    "PasswordAuthentication": ("no", "perhaps"),
    "KbdInteractiveAuthentication": ("no", "perhaps"),
    "PreferredAuthentications": ("password,publickey", "telepathy"),
    "Compression": ("yes", "zip"),
    "Ciphers": ("aes256-ctr,aes128-ctr", "a b"),
    "KexAlgorithms": ("+curve25519-sha256", "a b"),
    "HostKeyAlgorithms": ("ssh-ed25519", "a b"),
    "MACs": ("hmac-sha2-256", "a b"),
    "AddressFamily": ("inet6", "ipx"),
    "GatewayPorts": ("yes", "wide"),
    "ExitOnForwardFailure": ("no", "later"),
    "LogLevel": ("DEBUG", "LOUD"),
    "ControlPath": ("~/.ssh/cm-%C", None),
    "ControlMaster": ("auto", "sometimes"),
}

KEYS = sorted(OPTION_KEYS.values(), key=lambda key: key.name)


def from_option(key: OptionKey, value: str) -> Config:
    return apply_ssh_config(
        build_config("alias", options=[f"{key.name}={value}"], config_file="none")
    )


def from_file(tmp_path: Path, key: OptionKey, value: str) -> Config:
    path = tmp_path / "ssh_config"
    path.write_text(f"Host alias\n    {key.name} {value}\n")
    return apply_ssh_config(build_config("alias", config_file=str(path)))


def without_files(config: Config) -> Config:
    """The Config with what differs by design left out: where ssh_config came from, -J
    as the command line gave it (the route both ways resolve to is in ``hops``), and
    whether a ControlPath was given on the command line (a missing master is an error
    then; one only from ssh_config falls back to logging in, as ssh does)."""
    return dataclasses.replace(
        config,
        ssh_config=None,
        jump_hosts=None,
        control_path_explicit=False,
        hops=tuple(without_files(hop) for hop in config.hops),
    )


def test_every_key_has_samples() -> None:
    assert {key.name for key in KEYS} == set(SAMPLES)


@pytest.mark.parametrize("key", KEYS, ids=lambda key: key.name)
def test_option_and_ssh_config_give_the_same_config(tmp_path: Path, key: OptionKey) -> None:
    value = SAMPLES[key.name][0]
    by_option = from_option(key, value)
    by_file = from_file(tmp_path, key, value)
    untouched = from_option(next(k for k in KEYS if k.name == "ExitOnForwardFailure"), "yes")
    if key.from_file is FromFile.MERGED:
        assert without_files(by_option) == without_files(by_file)
        assert without_files(by_file) != without_files(untouched)
    elif key.from_file is FromFile.AT_CONNECT:
        # The destination stays as given, so that asyncssh matches the same Host blocks
        # when it connects; where it connects is the same either way.
        assert by_file.destination == untouched.destination
        target = connect_target(by_file, by_file.destination)
        assert connect_target(by_option, by_option.destination) == target
        assert target != connect_target(untouched, untouched.destination)
    else:
        assert key.from_file is FromFile.CHECKED_ONLY
        assert without_files(by_file) == without_files(untouched)


@pytest.mark.parametrize(
    "key", [key for key in KEYS if SAMPLES[key.name][1] is not None], ids=lambda key: key.name
)
def test_a_bad_value_is_refused_both_ways(tmp_path: Path, key: OptionKey) -> None:
    bad = SAMPLES[key.name][1]
    assert bad is not None
    with pytest.raises(ConfigError, match=key.name):
        from_option(key, bad)
    with pytest.raises(ConfigError) as caught:
        from_file(tmp_path, key, bad)
    # The file's own error: which file, which line, which key.
    assert f"{tmp_path / 'ssh_config'} line 2" in caught.value.message
    assert key.name.lower() in caught.value.message.lower()


def test_the_file_reader_maps_only_table_keys() -> None:
    ours = {
        name
        for name, handler in _FileConfig._handlers.items()
        if SSHClientConfig._handlers.get(name) != handler
    }
    assert ours == set(OPTION_KEYS)

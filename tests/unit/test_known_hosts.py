"""known_hosts matching and writing (``tunnel.hostkeys``), and the policy applied on top
(``tunnel.trust.HostKeys``, with asyncssh's keys as the session hands them), without any
connection.

The rules pinned here are OpenSSH's: a host on another port than 22 is ``[host]:port``,
a different host from ``host``; the bare host's key is trusted on other ports only when
it is the server's key; the address a connection reached is not looked up; a changed or
revoked key is never accepted, whatever StrictHostKeyChecking says.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from pathlib import Path

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel import hostkeys
from tunnel.config import HostKeyPolicy
from tunnel.hostkeys import KnownKey, Marker
from tunnel.session import ASYNCSSH_KEYS
from tunnel.trust import HostKeys

PROPERTY = settings(max_examples=300, deadline=None)

# Two made-up blobs: matching never decodes them, only compares the text.
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
RSA_C = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC"


def hashed_name(name: str, salt: bytes) -> str:
    """The hashed form, computed here on its own (not with the code under test)."""
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return "|1|" + base64.b64encode(salt).decode() + "|" + base64.b64encode(digest).decode()


def blobs(keys: tuple[KnownKey, ...] | list[KnownKey]) -> list[str]:
    return [key.public for key in keys]


# -- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "name"),
    [
        ("example.org", 22, "example.org"),
        ("example.org", None, "example.org"),
        ("example.org", 2222, "[example.org]:2222"),
        ("Example.ORG", 2222, "[example.org]:2222"),  # ssh lowercases the host
        ("127.0.0.1", 22, "127.0.0.1"),
        ("::1", 22, "::1"),
        ("::1", 2200, "[::1]:2200"),
    ],
)
def test_host_name(host: str, port: int | None, name: str) -> None:
    assert hostkeys.host_name(host, port) == name


@pytest.mark.parametrize(
    ("field", "name", "matches"),
    [
        ("example.org", "example.org", True),
        ("EXAMPLE.org", "example.org", True),
        ("example.org", "[example.org]:2222", False),
        ("[example.org]:2222", "example.org", False),
        ("[example.org]:2222", "[example.org]:2222", True),
        ("[example.org]:2222", "[example.org]:22222", False),
        ("[example.org]:2222", "e]:2222", False),  # brackets are literal, not a class
        ("other.org,example.org", "example.org", True),
        ("*.org", "example.org", True),
        ("*.org", "[example.org]:2222", False),
        ("*", "[example.org]:2222", True),
        ("[example.org]:*", "[example.org]:2222", True),
        ("exampl?.org", "example.org", True),
        ("exampl?.org", "exampl.org", False),
        ("*.org,!example.org", "example.org", False),  # a negation vetoes the line
        ("!example.org,*.org", "example.org", False),
        ("*.org,!other.org", "example.org", True),
        ("!other.org", "example.org", False),  # only negations: no match
        ("example.org.", "example.org", False),
        ("", "example.org", False),
        (",", "example.org", False),
    ],
)
def test_names_match(field: str, name: str, matches: bool) -> None:
    assert hostkeys.names_match(field, name) is matches


SALT = bytes(range(20))


@pytest.mark.parametrize(
    ("hashed_for", "name", "matches"),
    [
        ("example.org", "example.org", True),
        ("example.org", "[example.org]:2222", False),
        ("[example.org]:2222", "[example.org]:2222", True),
        ("[example.org]:2222", "example.org", False),
        ("127.0.0.1", "localhost", False),
    ],
)
def test_hashed_names_match_one_form_only(hashed_for: str, name: str, matches: bool) -> None:
    assert hostkeys.names_match(hashed_name(hashed_for, SALT), name) is matches


@pytest.mark.parametrize(
    "field",
    [
        "|2|" + base64.b64encode(SALT).decode() + "|AAAA",  # unknown hash type
        "|1|not base64!|AAAA",
        "|1|" + base64.b64encode(SALT).decode(),  # no hash
        hashed_name("example.org", SALT) + "|",  # trailing part
    ],
)
def test_malformed_hashes_match_nothing(field: str) -> None:
    assert not hostkeys.names_match(field, "example.org")


def test_hash_known_host_is_the_known_hosts_form() -> None:
    assert hostkeys.hash_known_host("[example.org]:2222", SALT) == hashed_name(
        "[example.org]:2222", SALT
    )


@PROPERTY
@given(name=st.text(min_size=1), salt=st.binary(min_size=1, max_size=64))
def test_a_hashed_name_matches_itself_and_not_its_port_form(name: str, salt: bytes) -> None:
    field = hostkeys.hash_known_host(name, salt)
    assert hostkeys.names_match(field, name)
    assert not hostkeys.names_match(field, f"[{name}]:2222")


@PROPERTY
@given(field=st.text(), name=st.text())
def test_any_field_is_only_a_yes_or_no(field: str, name: str) -> None:
    assert hostkeys.names_match(field, name) in (True, False)


# -- lines -----------------------------------------------------------------------------------


def test_entries_for_reads_markers_comments_and_odd_lines() -> None:
    text = "\n".join(
        [
            "# example.org " + KEY_B,
            "",
            "   ",
            "example.org " + KEY_A + " a comment",
            "@cert-authority *.org " + KEY_B,
            "@revoked * " + RSA_C,
            "@unknown example.org " + KEY_B,  # ssh skips a line with an unknown marker
            "example.org ssh-ed25519",  # no key
            "\texample.org\t" + KEY_B + "\r",  # tabs and a CRLF ending are whitespace
        ]
    )
    found = hostkeys.entries_for(text, "example.org", "kh")
    assert [(k.marker, k.public, k.where) for k in found] == [
        (None, KEY_A, "kh:4"),
        (Marker.CERT_AUTHORITY, KEY_B, "kh:5"),
        (Marker.REVOKED, RSA_C, "kh:6"),
        (None, KEY_B, "kh:9"),
    ]


def test_a_lone_carriage_return_does_not_end_a_line() -> None:
    # ssh reads lines up to "\n": "\r" inside a line is not a line break.
    text = f"other.org {KEY_B}\rexample.org {KEY_A}\n"
    assert hostkeys.entries_for(text, "example.org", "kh") == []


@PROPERTY
@given(text=st.text(), name=st.text(min_size=1))
def test_any_file_text_gives_entries_or_nothing(text: str, name: str) -> None:
    for entry in hostkeys.entries_for(text, name, "kh"):
        assert entry.key_type
        assert entry.blob


# -- what a lookup trusts ---------------------------------------------------------------------


def known(public: str, marker: Marker | None = None, where: str = "kh:1") -> KnownKey:
    key_type, blob = public.split()
    return KnownKey(marker, key_type, blob, where)


def test_the_port_form_alone_decides_the_types_it_has() -> None:
    lookup = hostkeys.decide_lookup([known(KEY_A)], [known(KEY_B)])
    assert blobs(lookup.for_name) == [KEY_A]
    assert blobs(lookup.trusted) == [KEY_A]  # the bare host's other key: not trusted


def test_the_bare_host_counts_only_when_the_port_form_knows_no_key() -> None:
    # Any key for [host]:port, of any type, makes the server's key known or changed.
    lookup = hostkeys.decide_lookup([known(RSA_C)], [known(KEY_A), known(RSA_C)])
    assert blobs(lookup.for_name) == [RSA_C]
    assert blobs(lookup.trusted) == [RSA_C]
    # Markers alone do not make the port form known.
    only_marks = hostkeys.decide_lookup([known(RSA_C, Marker.REVOKED)], [known(KEY_A)])
    assert blobs(only_marks.trusted) == [KEY_A]


def test_the_bare_host_never_makes_a_key_changed() -> None:
    lookup = hostkeys.decide_lookup([], [known(KEY_B)])
    assert lookup.for_name == ()
    assert blobs(lookup.trusted) == [KEY_B]


def test_revoked_lines_of_either_form_count() -> None:
    lookup = hostkeys.decide_lookup(
        [known(KEY_A, Marker.REVOKED)], [known(KEY_B, Marker.REVOKED), known(RSA_C)]
    )
    assert blobs(lookup.revoked) == [KEY_A, KEY_B]
    assert blobs(lookup.trusted) == [RSA_C]


def test_authorities_of_the_port_form_win() -> None:
    port = known(KEY_A, Marker.CERT_AUTHORITY)
    bare = known(KEY_B, Marker.CERT_AUTHORITY)
    assert blobs(hostkeys.decide_lookup([port], [bare]).authorities) == [KEY_A]
    assert blobs(hostkeys.decide_lookup([], [bare]).authorities) == [KEY_B]


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    user = tmp_path / "known_hosts"
    user.write_text(
        f"example.org {KEY_A}\n"
        f"[example.org]:2222 {RSA_C}\n"
        f"{hashed_name('[example.org]:2200', SALT)} {KEY_B}\n"
        f"192.0.2.7 {KEY_B}\n"
    )
    system = tmp_path / "ssh_known_hosts"
    system.write_text(f"@revoked * {RSA_C}\n")
    return [str(user), str(tmp_path / "missing"), str(system)]


def test_lookup_on_port_22_ignores_port_forms(files: list[str]) -> None:
    lookup = hostkeys.lookup(files, "example.org", 22)
    assert blobs(lookup.for_name) == [KEY_A]
    assert blobs(lookup.trusted) == [KEY_A]
    assert [k.where.rsplit("/", 1)[1] for k in lookup.revoked] == ["ssh_known_hosts:1"]


def test_lookup_on_another_port(files: list[str]) -> None:
    lookup = hostkeys.lookup(files, "EXAMPLE.org", 2222)
    assert blobs(lookup.for_name) == [RSA_C]
    assert blobs(lookup.trusted) == [RSA_C]
    bare = hostkeys.lookup(files, "example.org", 2300)
    assert blobs(bare.for_name) == []
    assert blobs(bare.trusted) == [KEY_A]
    hashed = hostkeys.lookup(files, "example.org", 2200)
    assert blobs(hashed.for_name) == [KEY_B]
    assert blobs(hashed.trusted) == [KEY_B]  # the bare ed25519 key is another one


def test_lookup_of_a_name_never_uses_an_address_line(files: list[str]) -> None:
    assert hostkeys.lookup(files, "elsewhere.example", 22).trusted == ()
    assert blobs(hostkeys.lookup(files, "192.0.2.7", 22).trusted) == [KEY_B]


# -- writing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("", "new\n"),
        ("old\n", "old\nnew\n"),
        ("old", "old\nnew\n"),  # an unterminated last line is ended, not glued to
        ("old\r\n", "old\r\nnew\n"),
        ("a\nb", "a\nb\nnew\n"),
    ],
)
def test_append_line(tmp_path: Path, before: str, after: str) -> None:
    path = tmp_path / "known_hosts"
    path.write_bytes(before.encode())
    hostkeys.append_line(path, "new")
    assert path.read_bytes() == after.encode()


def test_append_line_creates_a_private_directory(tmp_path: Path) -> None:
    path = tmp_path / "ssh" / "known_hosts"
    hostkeys.append_line(path, "new")
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(os.stat(path.parent).st_mode) & 0o077 == 0


def test_append_line_to_dev_null() -> None:
    hostkeys.append_line(Path(os.devnull), "new")


def test_appended_entries_both_match(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"old.example {KEY_A}")
    hostkeys.append_line(path, hostkeys.known_hosts_line("[new.example]:2222", *KEY_B.split()))
    text = path.read_text()
    assert blobs(hostkeys.entries_for(text, "old.example", "kh")) == [KEY_A]
    assert blobs(hostkeys.entries_for(text, "[new.example]:2222", "kh")) == [KEY_B]


def test_known_hosts_line_hashed_matches_only_its_name() -> None:
    line = hostkeys.known_hosts_line("[example.org]:2222", *KEY_A.split(), salt=SALT)
    assert line == f"{hashed_name('[example.org]:2222', SALT)} {KEY_A}"


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("example.org", True),
        ("127.0.0.1", True),
        ("::1", True),
        ("", False),
        ("*.org", False),
        ("a?", False),
        ("[example.org]:22", False),
        ("a,b", False),  # would record the key for two hosts
        ("!a", False),
        ("|1|x|y", False),
        ("@revoked", False),
        ("a b", False),
        ("a\nb ssh-ed25519 AAAA", False),  # would write a second line
        ("a#b", False),
        ("bücher.example", False),  # not ASCII: ssh would want the punycode form
    ],
)
def test_recordable(host: str, ok: bool) -> None:
    assert hostkeys.recordable(host) is ok


# -- the session's policy on top -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519").convert_to_public()


@pytest.fixture(scope="module")
def stranger_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519").convert_to_public()


def public(key: asyncssh.SSHKey) -> str:
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def decide(policy: HostKeyPolicy, path: Path, key: asyncssh.SSHKey, port: int = 2222) -> bool:
    """What the session does with ``key`` from example.org:port, as asyncssh would ask."""
    keys = HostKeys(ASYNCSSH_KEYS, policy, [str(path)], [], None, set())
    trusted, _, revoked = keys.match("example.org", "192.0.2.7", port)
    if key in revoked:
        return False  # asyncssh refuses a revoked key before asking
    return key in trusted or keys.decide("example.org", "192.0.2.7", port, key)


POLICIES = list(HostKeyPolicy)


@pytest.mark.parametrize("policy", POLICIES, ids=[p.value for p in POLICIES])
def test_a_changed_key_is_refused_whatever_the_policy(
    tmp_path: Path,
    policy: HostKeyPolicy,
    server_key: asyncssh.SSHKey,
    stranger_key: asyncssh.SSHKey,
) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"[example.org]:2222 {public(stranger_key)}\n")
    before = path.read_text()
    assert not decide(policy, path, server_key)
    assert path.read_text() == before


@pytest.mark.parametrize("policy", POLICIES, ids=[p.value for p in POLICIES])
def test_a_key_of_another_type_than_the_known_one_is_changed(
    tmp_path: Path, policy: HostKeyPolicy, server_key: asyncssh.SSHKey
) -> None:
    # As ssh: the server offers ed25519, known_hosts knows only an RSA key for the name.
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048).convert_to_public()
    path = tmp_path / "known_hosts"
    path.write_text(f"[example.org]:2222 {public(rsa)}\n")
    keys = HostKeys(ASYNCSSH_KEYS, policy, [str(path)], [], None, set())
    keys.match("example.org", "192.0.2.7", 2222)
    assert not keys.decide("example.org", "192.0.2.7", 2222, server_key)
    assert keys.verdict is not None
    assert keys.verdict.changed
    assert keys.verdict.old_line == f"{path}:1"
    assert keys.verdict.other_types == ("ssh-rsa",)
    assert "ssh-rsa" in keys.error().message
    assert len(path.read_text().splitlines()) == 1


@pytest.mark.parametrize("policy", POLICIES, ids=[p.value for p in POLICIES])
def test_a_revoked_key_is_refused_whatever_the_policy(
    tmp_path: Path, policy: HostKeyPolicy, server_key: asyncssh.SSHKey
) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"@revoked example.org {public(server_key)}\n")  # the bare form counts
    assert not decide(policy, path, server_key)


@pytest.mark.parametrize(
    ("policy", "accepted"),
    [
        (HostKeyPolicy.YES, False),
        (HostKeyPolicy.ASK, False),  # no terminal here: refused, as ssh without one
        (HostKeyPolicy.ACCEPT_NEW, True),
        (HostKeyPolicy.NO, True),
    ],
    ids=lambda value: value.value if isinstance(value, HostKeyPolicy) else str(value),
)
def test_an_unknown_key_beside_a_bare_host_entry(
    tmp_path: Path,
    policy: HostKeyPolicy,
    accepted: bool,
    server_key: asyncssh.SSHKey,
    stranger_key: asyncssh.SSHKey,
) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"example.org {public(stranger_key)}")  # port 22, no final newline
    assert decide(policy, path, server_key) is accepted
    lines = path.read_text().splitlines()
    assert lines[0] == f"example.org {public(stranger_key)}"
    if accepted:
        assert lines[1:] == [f"[example.org]:2222 {public(server_key)}"]
        assert decide(HostKeyPolicy.YES, path, server_key)
    else:
        assert lines[1:] == []


def test_a_port_entry_says_nothing_about_port_22(
    tmp_path: Path, server_key: asyncssh.SSHKey, stranger_key: asyncssh.SSHKey
) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(
        f"[example.org]:22 {public(stranger_key)}\n[example.org]:2222 {public(server_key)}\n"
    )
    keys = HostKeys(ASYNCSSH_KEYS, HostKeyPolicy.YES, [str(path)], [], None, set())
    assert keys.match("example.org", "192.0.2.7", None) == ([], [], [])
    assert not keys.decide("example.org", "192.0.2.7", 22, server_key)
    assert keys.verdict is not None
    assert not keys.verdict.changed


def test_an_address_entry_is_neither_trust_nor_a_changed_key(
    tmp_path: Path, server_key: asyncssh.SSHKey, stranger_key: asyncssh.SSHKey
) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"[192.0.2.7]:2222 {public(server_key)}\n192.0.2.7 {public(stranger_key)}\n")
    assert not decide(HostKeyPolicy.YES, path, server_key)
    keys = HostKeys(ASYNCSSH_KEYS, HostKeyPolicy.YES, [str(path)], [], None, set())
    keys.match("example.org", "192.0.2.7", 2222)
    keys.decide("example.org", "192.0.2.7", 2222, server_key)
    assert keys.verdict is not None
    assert not keys.verdict.changed


@pytest.mark.parametrize("host", ["*", "a,b", "a\nb"])
def test_no_new_key_for_a_name_that_cannot_be_recorded(
    tmp_path: Path, server_key: asyncssh.SSHKey, host: str
) -> None:
    # ssh refuses these names as unknown hosts too ("invalid hostname; will not record").
    path = tmp_path / "known_hosts"
    for policy in (HostKeyPolicy.NO, HostKeyPolicy.ACCEPT_NEW):
        keys = HostKeys(ASYNCSSH_KEYS, policy, [str(path)], [], None, set())
        keys.match(host, "192.0.2.7", 22)
        assert not keys.decide(host, "192.0.2.7", 22, server_key)
    assert not path.exists()


@PROPERTY
@given(
    name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-:[]", min_size=1),
    cut=st.integers(min_value=0),
)
def test_plain_and_wildcard_patterns_agree(name: str, cut: int) -> None:
    assert hostkeys.names_match(name.upper(), name)
    position = cut % (len(name) + 1)
    assert hostkeys.names_match(name[:position] + "*", name)
    assert hostkeys.names_match("?" * len(name), name)
    assert not hostkeys.names_match("?" * (len(name) + 1), name)


def test_a_changed_key_in_another_file_names_that_file_for_ssh_keygen(
    tmp_path: Path, server_key: asyncssh.SSHKey, stranger_key: asyncssh.SSHKey
) -> None:
    # Plain `ssh-keygen -R` edits ~/.ssh/known_hosts: the wrong file here.
    path = tmp_path / "custom_known_hosts"
    path.write_text(f"[example.org]:2222 {public(stranger_key)}\n")
    keys = HostKeys(ASYNCSSH_KEYS, HostKeyPolicy.YES, [str(path)], [], None, set())
    keys.match("example.org", "192.0.2.7", 2222)
    assert not keys.decide("example.org", "192.0.2.7", 2222, server_key)
    assert keys.error().hint is not None
    assert f"`ssh-keygen -f '{path}' -R '[example.org]:2222'`" in keys.error().hint


def test_a_changed_key_in_the_default_file_needs_no_f(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server_key: asyncssh.SSHKey,
    stranger_key: asyncssh.SSHKey,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / ".ssh" / "known_hosts"
    path.parent.mkdir()
    path.write_text(f"[example.org]:2222 {public(stranger_key)}\n")
    keys = HostKeys(ASYNCSSH_KEYS, HostKeyPolicy.YES, ["~/.ssh/known_hosts"], [], None, set())
    keys.match("example.org", "192.0.2.7", 2222)
    assert not keys.decide("example.org", "192.0.2.7", 2222, server_key)
    assert "`ssh-keygen -R '[example.org]:2222'`" in (keys.error().hint or "")

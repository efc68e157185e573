"""Peer checks for SOCKS BIND (tunnel.rules): ``same_host``, ``is_loopback`` and
``bind_peer_allowed``. RFC 1928: the server "MAY use DST.ADDR" of a BIND to decide
which incoming connection to take; pytunnel takes only that peer when it can tell."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tunnel.rules import bind_peer_allowed, is_loopback, same_host

PROPERTY = settings(max_examples=250, deadline=None)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def plain(address: Address) -> Address:
    """The host an address names: an IPv4-mapped IPv6 address is its IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# == same_host ===============================================================================

SAME = [
    ("identical-ipv4", "192.0.2.7", "192.0.2.7"),
    # A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6.
    ("mapped-vs-ipv4", "::ffff:192.0.2.7", "192.0.2.7"),
    ("ipv4-vs-mapped", "192.0.2.7", "::ffff:192.0.2.7"),
    ("mapped-hex-form", "::ffff:c000:207", "192.0.2.7"),
    ("ipv6-spellings", "2001:db8::7", "2001:0db8:0000:0000:0000:0000:0000:0007"),
    ("ipv6-case", "2001:DB8::A", "2001:db8::a"),
    # A zone id picks an interface, not another host.
    ("zone-id-ignored", "fe80::1%eth0", "fe80::1"),
    ("different-zone-ids", "fe80::1%eth0", "fe80::1%2"),
    ("brackets", "[2001:db8::7]", "2001:db8::7"),
    ("name-case", "Peer.Example", "peer.example"),
    ("localhost-case", "LOCALHOST", "localhost"),
]

DIFFERENT = [
    ("other-ipv4", "192.0.2.7", "192.0.2.8"),
    ("other-ipv6", "2001:db8::7", "2001:db8::8"),
    ("mapped-other-ipv4", "::ffff:192.0.2.7", "192.0.2.8"),
    # Not mapped: an IPv4-compatible (deprecated) address is a different IPv6 address.
    ("ipv4-compatible-is-not-mapped", "::192.0.2.7", "192.0.2.7"),
    ("loopbacks-of-two-families", "127.0.0.1", "::1"),
    # Names are never resolved: a name and an address never match.
    ("name-vs-address", "localhost", "127.0.0.1"),
    ("other-names", "peer.example", "other.example"),
]


@pytest.mark.parametrize(("first", "second"), [pytest.param(a, b, id=name) for name, a, b in SAME])
def test_same_host(first: str, second: str) -> None:
    assert same_host(first, second)
    assert same_host(second, first)


@pytest.mark.parametrize(
    ("first", "second"), [pytest.param(a, b, id=name) for name, a, b in DIFFERENT]
)
def test_not_same_host(first: str, second: str) -> None:
    assert not same_host(first, second)
    assert not same_host(second, first)


@PROPERTY
@given(address=st.ip_addresses(v=4))
def test_every_ipv4_address_is_its_mapped_form(address: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)
    assert same_host(str(mapped), str(address))
    assert same_host(f"[{mapped}]", str(address))


@PROPERTY
@given(first=st.ip_addresses(), second=st.ip_addresses())
@example(first=ipaddress.ip_address("::ffff:192.0.2.7"), second=ipaddress.ip_address("192.0.2.7"))
def test_distinct_addresses_of_one_family_differ(first: Address, second: Address) -> None:
    assert same_host(str(first), str(second)) == (plain(first) == plain(second))


# == is_loopback =============================================================================

LOOPBACK = [
    ("ipv4", "127.0.0.1"),
    ("all-of-127/8", "127.45.6.7"),
    ("ipv6", "::1"),
    ("bracketed-ipv6", "[::1]"),
    ("ipv6-with-zone", "::1%lo"),
    ("mapped-ipv4", "::ffff:127.0.0.1"),
    ("localhost", "localhost"),
    ("localhost-case", "LocalHost"),
]

NOT_LOOPBACK = [
    ("other-ipv4", "192.0.2.7"),
    ("other-ipv6", "2001:db8::1"),
    # The unspecified addresses are "any", not loopback, when it comes to a peer.
    ("unspecified-ipv4", "0.0.0.0"),
    ("unspecified-ipv6", "::"),
    ("link-local", "fe80::1%lo"),
    ("mapped-other", "::ffff:192.0.2.7"),
    ("other-name", "peer.example"),
    # Only the name itself: a name that merely starts like it is not resolved.
    ("localhost-domain", "localhost.localdomain"),
]


@pytest.mark.parametrize("host", [pytest.param(host, id=name) for name, host in LOOPBACK])
def test_is_loopback(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", [pytest.param(host, id=name) for name, host in NOT_LOOPBACK])
def test_is_not_loopback(host: str) -> None:
    assert not is_loopback(host)


# == bind_peer_allowed =========================================================================

ALLOWED = [
    ("exact-ipv4", "192.0.2.7", "192.0.2.7"),
    ("exact-ipv6", "2001:db8::7", "2001:db8::7"),
    ("mapped-peer", "192.0.2.7", "::ffff:192.0.2.7"),
    ("mapped-expected", "::ffff:192.0.2.7", "192.0.2.7"),
    ("zone-on-peer", "fe80::7", "fe80::7%eth0"),
    # 0.0.0.0 and :: say "I do not know the peer's address": anyone.
    ("any-ipv4-takes-ipv4", "0.0.0.0", "203.0.113.5"),
    ("any-ipv4-takes-ipv6", "0.0.0.0", "2001:db8::5"),
    ("any-ipv6-takes-ipv4", "::", "203.0.113.5"),
    ("any-ipv6-takes-ipv6", "::", "2001:db8::5"),
    ("any-mapped", "::ffff:0.0.0.0", "203.0.113.5"),
    # localhost: only a peer on the server itself.
    ("localhost-ipv4", "localhost", "127.0.0.1"),
    ("localhost-ipv6", "localhost", "::1"),
    ("localhost-mapped", "localhost", "::ffff:127.0.0.1"),
    ("localhost-case", "LocalHost", "127.0.0.1"),
    # Other names cannot be compared without resolving them at the far end: anyone.
    ("name-takes-ipv4", "ftp.example", "203.0.113.5"),
    ("name-takes-ipv6", "ftp.example", "2001:db8::5"),
    ("name-takes-loopback", "ftp.example", "127.0.0.1"),
]

REFUSED = [
    ("other-ipv4", "192.0.2.7", "192.0.2.8"),
    ("other-ipv6", "2001:db8::7", "2001:db8::8"),
    ("mapped-other", "192.0.2.7", "::ffff:192.0.2.8"),
    ("other-family-loopback", "127.0.0.1", "::1"),
    ("localhost-refuses-ipv4", "localhost", "203.0.113.5"),
    ("localhost-refuses-ipv6", "localhost", "2001:db8::5"),
    ("localhost-refuses-unspecified", "localhost", "0.0.0.0"),
    ("LOCALHOST-refuses", "LOCALHOST", "203.0.113.5"),
]


@pytest.mark.parametrize(
    ("expected", "peer"), [pytest.param(e, p, id=name) for name, e, p in ALLOWED]
)
def test_bind_peer_allowed(expected: str, peer: str) -> None:
    assert bind_peer_allowed(expected, peer)


@pytest.mark.parametrize(
    ("expected", "peer"), [pytest.param(e, p, id=name) for name, e, p in REFUSED]
)
def test_bind_peer_refused(expected: str, peer: str) -> None:
    assert not bind_peer_allowed(expected, peer)


@PROPERTY
@given(expected=st.ip_addresses(), peer=st.ip_addresses())
# Random draws rarely hit these: the unspecified address mapped, and a mapped peer.
@example(expected=ipaddress.ip_address("::ffff:0.0.0.0"), peer=ipaddress.ip_address("192.0.2.7"))
@example(expected=ipaddress.ip_address("192.0.2.7"), peer=ipaddress.ip_address("::ffff:192.0.2.7"))
def test_an_address_other_than_unspecified_takes_only_itself(
    expected: Address, peer: Address
) -> None:
    allowed = bind_peer_allowed(str(expected), str(peer))
    # ::ffff:0.0.0.0 is 0.0.0.0 too: checked on the plain form.
    if plain(expected).is_unspecified:
        assert allowed
    else:
        assert allowed == same_host(str(expected), str(peer))

"""Host names and text from the network: one normal form, and one safe way to show it.

:func:`normalize_host` turns a destination as a client sent it into the form that is
both matched against the ``--allow``/``--deny`` rules and forwarded to the server, so the
two can never disagree: UTS 46 mapping (full-width digits and letters, the ideographic
full stop, upper case), one trailing dot dropped, IDNA 2008 A-labels for what is still
not ASCII, and a name that then reads as an IPv4 address in any form ``inet_aton``
accepts written out as its dotted quad. Without this, ``１２７.０.０.１`` passes a
``--deny 127.0.0.0/8`` and a resolver that maps Unicode (Python's ``idna`` codec on the
``-R`` side, libc with ``AI_IDN``) connects to 127.0.0.1.

:func:`printable` is what every renderer passes untrusted text through: control and
format characters come out as backslash escapes, so a name, a user name or a server's
message can neither start a new log line nor send escape sequences to the terminal.

Pure: no lookups, no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import unicodedata
from typing import Final

import idna

# Kept as is in a label of a rule's glob (see ``glob=True``).
GLOB_CHARACTERS: Final = frozenset("*?[]!")

_NUMBER = r"(?:0[xX][0-9a-fA-F]+|[0-9]+)"
# What inet_aton reads as an IPv4 address: 1 to 4 parts, decimal, octal or hex.
INET_ATON: Final = re.compile(rf"{_NUMBER}(?:\.{_NUMBER}){{0,3}}")


class BadName(ValueError):
    """A destination that is no host name. The message never quotes the name."""


def is_control(char: str) -> bool:
    """Characters a terminal or a log reader may act on rather than show: C0, DEL and
    C1 controls, format characters (bidi overrides, zero-width joiners), line and
    paragraph separators, and lone surrogates (undecodable bytes)."""
    return unicodedata.category(char) in _UNSAFE_CATEGORIES


_UNSAFE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def has_control(text: str) -> bool:
    # Every unsafe category is one str.isprintable() refuses: the fast answer first.
    return not text.isprintable() and any(is_control(char) for char in text)


# A request's host is brought to its normal form by the handshake, the policy check and
# the router in turn (and the same names come again and again): the answers are kept.
# Bounded, so a client sending endless names costs at most this many entries.
NORMAL_FORMS_KEPT: Final = 1024


@functools.lru_cache(maxsize=NORMAL_FORMS_KEPT)
def normalize_host(host: str, *, glob: bool = False) -> str:
    """The normal form of a destination host (see the module's docstring); raises
    :class:`BadName` for one that has none. IP literals are returned as they are.
    Idempotent: the normal form of a normal form is itself.

    ``glob=True`` is for rule patterns: a label holding glob characters is kept as
    written (lower case), and may not hold anything that is not ASCII."""
    if not host:
        raise BadName("empty host name")
    if has_control(host):
        raise BadName("control character in host name")
    if _ip_literal(host):
        return host
    if host.isascii():
        # For ASCII, UTS 46 mapping is lower case; std3 rules stay off, as for libc.
        mapped = host.lower()
    else:
        try:
            mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        except idna.IDNAError as exc:
            raise BadName(f"not a valid international name ({_idna_reason(exc)})") from None
        if has_control(mapped):
            raise BadName("control character in host name")
        if _ip_literal(mapped):
            return mapped
    if mapped.endswith("."):
        mapped = mapped[:-1]
    labels = mapped.split(".")
    if not all(labels):
        raise BadName("empty label in host name")
    name = ".".join(_label(label, glob) for label in labels)
    if INET_ATON.fullmatch(name):
        # The address libc reads it as, so what the server connects to is what was
        # checked, whichever resolver reads it.
        try:
            return socket.inet_ntoa(socket.inet_aton(name))
        except OSError:
            pass  # not a number libc reads ("08", too big): a name, as for the server
    return name


def _label(label: str, glob: bool) -> str:
    if label.isascii():
        return label
    if glob and not GLOB_CHARACTERS.isdisjoint(label):
        raise BadName("a glob label must be ASCII: write its name part in A-label form")
    try:
        return idna.alabel(label).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise BadName(f"not a valid international name ({_idna_reason(exc)})") from None


def _idna_reason(exc: Exception) -> str:
    # The idna package quotes the label in its messages; the caller escapes what it
    # shows, but the label itself has no business in a refusal.
    return printable(_QUOTED.sub("the name", str(exc)))


_QUOTED: Final = re.compile(r"'.*'|\".*\"")


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with every control or format character (see :func:`is_control`)
    written as a backslash escape (``\\x1b``, ``\\u202e``), so the result shows what was
    sent and says nothing to a terminal. Characters in ``keep`` (a banner's newlines)
    stay as they are. Idempotent, so text escaped where it is refused (a name in an
    event) is not escaped twice by the renderer; the price is that a sent backslash
    is not escaped, so ``\\x1b`` may also have been sent as those four characters."""
    if text.isprintable():
        return text  # the common case: nothing to do
    out: list[str] = []
    for char in text:
        if char in keep or not is_control(char):
            out.append(char)
        else:
            code = ord(char)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


def user_name(raw: bytes) -> str:
    """A proxy user name as text, one to one: bytes that are not UTF-8 become lone
    surrogates (escaped by :func:`printable` wherever shown), so two names that differ
    in any byte never become one isolation key."""
    return raw.decode("utf-8", "surrogateescape")

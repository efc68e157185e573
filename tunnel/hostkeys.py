"""known_hosts as OpenSSH reads and writes it: which lines speak for a host, which keys
that makes trusted, changed or revoked, and appending a new line.

No asyncssh here: keys are the text of the file (type and base64 blob); the session turns
them into key objects. The rules follow OpenSSH's sshconnect.c and hostfile.c:

- a host is looked up under one name: ``host`` on port 22, ``[host]:port`` otherwise
  (lowercase, as ssh does); an entry for one port says nothing about another;
- a key known for the name that is not the server's, of any type, means the key changed;
- on another port, when the ``[host]:port`` name has no key at all, the bare ``host`` is
  looked up too ("checking without port identifier"): a matching key there is trusted, a
  different one means nothing (the host is new, never "changed");
- the address the connection reached is not looked up (ssh's CheckHostIP, off by default
  since OpenSSH 8.5), unless the host was given as that address;
- ``@revoked`` lines count for the name and, stricter than ssh, for the bare host too.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import hmac
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 22


class Marker(enum.Enum):
    """The markers known_hosts(5) allows before the host patterns."""

    CERT_AUTHORITY = "@cert-authority"
    REVOKED = "@revoked"


@dataclass(frozen=True, slots=True)
class KnownKey:
    """One key a known_hosts line names for the host looked up."""

    marker: Marker | None
    key_type: str
    blob: str  # base64, as in the file
    where: str  # "path:line", for messages

    @property
    def public(self) -> str:
        return f"{self.key_type} {self.blob}"


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the files say about one host on one port."""

    # Plain keys for the name itself: if the server's key is not one of them, it changed.
    for_name: tuple[KnownKey, ...]
    # Keys that are accepted without a question: for_name, or when it is empty, the bare
    # host's keys.
    trusted: tuple[KnownKey, ...]
    authorities: tuple[KnownKey, ...]
    revoked: tuple[KnownKey, ...]


def host_name(host: str, port: int | None) -> str:
    """The name known_hosts files this host under: ``host`` or ``[host]:port``."""
    host = host.lower()
    return host if port in (None, 0, DEFAULT_PORT) else f"[{host}]:{port}"


def hash_known_host(name: str, salt: bytes) -> str:
    """known_hosts' hashed form of a host name: ``|1|base64(salt)|base64(HMAC-SHA1)``."""
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def _hashed_matches(field: str, name: str) -> bool:
    parts = field.split("|")
    # "|1|salt|hash": an empty first part, magic 1 (HMAC-SHA1), nothing after the hash.
    if len(parts) != 4 or parts[0] or parts[1] != "1":
        return False
    try:
        salt = base64.b64decode(parts[2], validate=True)
        wanted = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return False
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return hmac.compare_digest(digest, wanted)


@functools.lru_cache(maxsize=1024)
def _wildcard(pattern: str) -> re.Pattern[str]:
    # Only * and ? are special, as in OpenSSH's match_pattern: "[host]:2222" is literal
    # (fnmatch would read the brackets as a character class).
    body = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    return re.compile(body, re.DOTALL)


def _pattern_matches(pattern: str, name: str) -> bool:
    if "*" not in pattern and "?" not in pattern:
        return pattern == name  # most lines: no regex needed
    return _wildcard(pattern).fullmatch(name) is not None


def names_match(field: str, name: str) -> bool:
    """Whether a known_hosts host field matches ``name`` (already lowercase).

    A hashed field is one name. Otherwise a comma-separated list of patterns, compared
    without regard to case; a matching ``!pattern`` vetoes the line."""
    if field.startswith("|"):
        return _hashed_matches(field, name)
    matched = False
    for pattern in field.split(","):
        negated = pattern.startswith("!")
        if negated:
            pattern = pattern[1:]
        if not pattern:
            continue
        if _pattern_matches(pattern.lower(), name):
            if negated:
                return False
            matched = True
    return matched


@dataclass(frozen=True, slots=True)
class _Line:
    marker: Marker | None
    names: str
    key_type: str
    blob: str


def _parse(line: str) -> _Line | None:
    """One known_hosts line, or None for a comment, a blank line or a line ssh skips."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker: Marker | None = None
    if fields[0].startswith("@"):
        try:
            marker = Marker(fields[0])
        except ValueError:
            return None  # an unknown marker: ssh ignores the whole line
        fields = fields[1:]
    if len(fields) < 3:
        return None
    return _Line(marker, fields[0], fields[1], fields[2])


def entries_for(text: str, name: str, path: str) -> list[KnownKey]:
    """The keys the lines of one file's ``text`` name for ``name``."""
    found: list[KnownKey] = []
    # Lines end at "\n" only, as for ssh's getline (a stray "\r" is whitespace).
    for number, line in enumerate(text.split("\n"), start=1):
        parsed = _parse(line)
        if parsed is not None and names_match(parsed.names, name):
            found.append(KnownKey(parsed.marker, parsed.key_type, parsed.blob, f"{path}:{number}"))
    return found


def read_entries(files: Iterable[str], names: Sequence[str]) -> list[list[KnownKey]]:
    """For each of ``names``, the keys all ``files`` name for it (missing files: none)."""
    found: list[list[KnownKey]] = [[] for _ in names]
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace", newline="") as handle:
                text = handle.read()
        except OSError:
            continue
        for index, name in enumerate(names):
            found[index].extend(entries_for(text, name, path))
    return found


def lookup(files: Iterable[str], host: str, port: int | None) -> Lookup:
    """What ``files`` say about ``host`` on ``port`` (see the module's rules)."""
    name = host_name(host, port)
    bare = host_name(host, DEFAULT_PORT)
    names = [name] if name == bare else [name, bare]
    found = read_entries(files, names)
    return decide_lookup(found[0], found[1] if len(found) > 1 else [])


def decide_lookup(for_name: Sequence[KnownKey], for_bare: Sequence[KnownKey]) -> Lookup:
    """Combine the entries for ``[host]:port`` and for the bare host (empty on port 22)."""
    plain = tuple(k for k in for_name if k.marker is None)
    # ssh looks at the bare host only when the name knows no key at all (any key there,
    # of any type, makes the server's key either known or changed).
    fallback = () if plain else tuple(k for k in for_bare if k.marker is None)
    authorities = tuple(k for k in for_name if k.marker is Marker.CERT_AUTHORITY)
    if not authorities:
        authorities = tuple(k for k in for_bare if k.marker is Marker.CERT_AUTHORITY)
    revoked = tuple(k for k in (*for_name, *for_bare) if k.marker is Marker.REVOKED)
    return Lookup(plain, plain + fallback, authorities, revoked)


# Characters that would make a recorded name a pattern, a hash, a second name or a second
# line; ssh refuses to record the first ones too ("invalid hostname; will not record").
_UNRECORDABLE = set("@?*#[]|'\"\\,!")


def recordable(host: str) -> bool:
    """Whether ``host`` can be written to known_hosts as the name of one host."""
    return bool(host) and all(
        char.isascii() and char.isprintable() and not char.isspace() and char not in _UNRECORDABLE
        for char in host
    )


def known_hosts_line(name: str, key_type: str, blob: str, salt: bytes | None = None) -> str:
    """The line recording a key for ``name``; hashed when a salt is given."""
    shown = name if salt is None else hash_known_host(name, salt)
    return f"{shown} {key_type} {blob}"


def uses_hashed_names(path: Path) -> bool:
    """Whether a known_hosts file already hides its host names (then so do we)."""
    try:
        with path.open(encoding="ascii", errors="replace") as handle:
            return any(line.startswith("|1|") for line in handle)
    except OSError:
        return False


def append_line(path: Path, line: str) -> None:
    """Append one line to a known_hosts file, creating it (and a private directory).

    A file whose last line lacks its newline gets one first, as OpenSSH does, or the new
    entry would be glued to the old one and both would stop matching."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        prefix = b""
        # Only a regular file can be looked back into (/dev/null, a pipe cannot).
        if stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            size = handle.seek(0, os.SEEK_END)
            if size > 0:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    prefix = b"\n"
        # Appends go to the end whatever the position ("a" mode).
        handle.write(prefix + line.encode("ascii") + b"\n")

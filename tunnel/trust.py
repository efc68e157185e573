"""Host-key trust as OpenSSH decides it: known_hosts (read by :mod:`tunnel.hostkeys`),
StrictHostKeyChecking for a key no line trusts, the question on the terminal, and the
line written for a key accepted.

The keys are the SSH library's; this room sees them through :class:`Key` and
:class:`KeyCodec` only, which the session fills in, so it needs no SSH library itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import events, hostkeys
from .config import HostKeyPolicy
from .errors import HostKeyRejected
from .prompts import ask_in_thread

log = logging.getLogger(__name__)

USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")


class Key(Hashable, Protocol):
    """A public host key, as the SSH library holds it."""

    @property
    def algorithm(self) -> bytes: ...

    @property
    def sig_algorithms(self) -> Sequence[bytes]: ...

    def get_fingerprint(self, hash_name: str = ...) -> str: ...

    def export_public_key(self, format_name: str = ...) -> bytes: ...


@dataclass(frozen=True, slots=True)
class KeyCodec:
    """What trust needs of the SSH library: ``load`` one known_hosts key ("type base64";
    ValueError when it does not parse) and the host-key algorithms it offers by default."""

    load: Callable[[str], Key]
    algorithms: Sequence[bytes]


@dataclass(frozen=True, slots=True)
class Verdict:
    changed: bool
    key_type: str
    fingerprint: str
    host: str
    old_line: str
    other_types: tuple[str, ...] = ()


class HostKeys:
    """Host-key trust as OpenSSH does it: known_hosts files, and StrictHostKeyChecking
    for keys that are not in them. :mod:`tunnel.hostkeys` reads the files; asyncssh
    checks the key against what we hand it; we decide the rest."""

    def __init__(
        self,
        keys: KeyCodec,
        policy: HostKeyPolicy,
        user_files: Sequence[str],
        global_files: Sequence[str],
        prompter: events.Prompter | None,
        accepted: set[Key],
        alias: str | None = None,
    ) -> None:
        self.keys = keys
        self.policy = policy
        # ssh_config's HostKeyAlias: asyncssh hands it to match() instead of the host.
        self.alias = alias
        self.user_files = tuple(os.path.expanduser(p) for p in user_files)
        self.files = self.user_files + tuple(os.path.expanduser(p) for p in global_files)
        self.prompter = prompter
        self.found = hostkeys.Lookup((), (), (), ())
        # The plain keys for the host's name, with their lines (for "changed").
        self.known_for_host: list[tuple[hostkeys.KnownKey, Key]] = []
        self.revoked: set[Key] = set()
        self.host = ""
        self.name = ""
        self.verdict: Verdict | None = None
        self.declined = False
        # A key met but not known, waiting for the question (policy ask).
        self.pending: tuple[str, str, Key] | None = None
        # Keys the person accepted this run (also when known_hosts is /dev/null).
        self.accepted = accepted

    def match(self, host: str, addr: str, port: int | None) -> Any:
        """asyncssh's known_hosts callback: trusted keys, CA keys, revoked keys. The
        address is not looked up (ssh's CheckHostIP, off by default): an entry for an
        address reused by another machine must not vouch for, or against, this one."""
        if self.alias is not None and host == self.alias:
            # As ssh: a HostKeyAlias names the key on its own, whatever the port.
            port = None
        self.host = host
        self.name = hostkeys.host_name(host, port)
        self.found = hostkeys.lookup(self.files, host, port)
        self.known_for_host = self._pairs(self.found.for_name)
        self.revoked = set(self._keys(self.found.revoked))
        return (
            self._keys(self.found.trusted),
            self._keys(self.found.authorities),
            list(self.revoked),
        )

    def preferred_algorithms(self, host: str, port: int | None) -> list[bytes] | None:
        """Host-key algorithms with the known keys' types first, then all the others:
        asyncssh alone would offer only the known types, and a server that lost that key
        type would fail key exchange instead of showing whose key it has now."""
        self.match(self.alias or host, "", port)  # the address is not known yet
        known = self._keys(self.found.trusted)
        if not known:
            return None
        algorithms: list[bytes] = []
        for key in known:
            algorithms.extend(key.sig_algorithms)
        algorithms.extend(self.keys.algorithms)
        return list(dict.fromkeys(algorithms))

    def decide(self, host: str, addr: str, port: int, key: Key) -> bool:
        """Called by asyncssh for a key no known_hosts line trusts."""
        # As ssh: any key known for the name that is not this one makes this one a changed
        # key, of whatever type (a server that lost its known key type, or someone who
        # cannot offer it). The line of the same type, if any, is the one to name.
        same_type = [
            entry for entry, known in self.known_for_host if known.algorithm == key.algorithm
        ]
        old = same_type or [entry for entry, _ in self.known_for_host]
        name = self.name or hostkeys.host_name(host, None if host == self.alias else port)
        fingerprint = key.get_fingerprint("sha256")
        self.verdict = Verdict(
            changed=bool(old),
            key_type=key.algorithm.decode("ascii"),
            fingerprint=fingerprint,
            host=name,
            old_line=old[0].where if old else "",
            # Named only when no key of the offered type is known.
            other_types=()
            if same_type
            else tuple(sorted({k.algorithm.decode("ascii") for _, k in self.known_for_host})),
        )
        if old or key in self.revoked:
            # A changed or revoked key is never accepted, whatever the policy: even with
            # "no", where ssh goes on without forwarding, a tunnel has nothing to offer.
            return False
        if not hostkeys.recordable(self.host or host):
            # As ssh: a new key for a name that cannot be written down as one plain host
            # (a pattern, a list, a second line) is never accepted, by any policy.
            return False
        if self.policy in (HostKeyPolicy.ACCEPT_NEW, HostKeyPolicy.NO):
            self._record(name, key)
            return True
        if key in self.accepted:
            return True
        if self.policy is HostKeyPolicy.ASK and self.prompter is not None:
            # asyncssh calls us synchronously, inside its connect timeout: the question
            # is asked by the session after this attempt, then the connection is retried.
            self.pending = (name, addr, key)
        return False

    async def ask(self) -> bool:
        """Ask about the key this attempt met (see decide); record it if accepted."""
        assert self.prompter is not None
        assert self.pending is not None
        name, addr, key = self.pending
        self.pending = None
        fingerprint = key.get_fingerprint("sha256")
        kind = key.algorithm.decode("ascii").removeprefix("ssh-").upper()
        question = (
            f"The authenticity of host '{name} ({addr})' can't be established.\n"
            f"{kind} key fingerprint is {fingerprint}.\n"
            "Are you sure you want to continue connecting (yes/no/[fingerprint])? "
        )
        while True:
            answer = await ask_in_thread(self.prompter, question, echo=True)
            if answer is None or answer.strip().lower() == "no":
                self.declined = True
                return False
            if answer.strip().lower() == "yes" or answer.strip() == fingerprint:
                self.accepted.add(key)
                self._record(name, key)
                return True
            question = "Please type 'yes', 'no' or the fingerprint: "

    def _record(self, name: str, key: Key) -> None:
        path = Path(self.user_files[0])
        key_type, blob = key.export_public_key("openssh").decode().split()[:2]
        salt = os.urandom(20) if hostkeys.uses_hashed_names(path) else None
        line = hostkeys.known_hosts_line(name, key_type, blob, salt)
        try:
            hostkeys.append_line(path, line)
        except OSError as exc:
            # As ssh: the key was accepted for this connection; only remembering it failed.
            log.warning(
                "Failed to add the host to the list of known hosts (%s): %s", path, exc.strerror
            )
            return
        log.warning(
            "Permanently added '%s' (%s) to the list of known hosts (%s).",
            name,
            key_type,
            path,
        )

    def _pairs(self, known: Sequence[hostkeys.KnownKey]) -> list[tuple[hostkeys.KnownKey, Key]]:
        """known_hosts lines with their keys; a line whose key does not parse is skipped,
        as ssh skips it."""
        pairs: list[tuple[hostkeys.KnownKey, Key]] = []
        for entry in known:
            try:
                pairs.append((entry, self.keys.load(entry.public)))
            except ValueError:
                continue
        return pairs

    def _keys(self, known: Sequence[hostkeys.KnownKey]) -> list[Key]:
        return [key for _, key in self._pairs(known)]

    def error(self) -> HostKeyRejected:
        v = self.verdict
        if v is None:
            # asyncssh refuses a revoked key before asking us anything.
            return HostKeyRejected(
                f"REVOKED host key for {self.name or 'the server'}: known_hosts marks the "
                "key the server offered @revoked; refusing to connect",
                hint="the server's key was withdrawn on purpose; ask its owner for the new one",
            )
        if v.changed:
            also = ""
            if v.other_types:
                also = f" (a {', '.join(v.other_types)} key; the server offered no such key)"
            return HostKeyRejected(
                f"HOST KEY CHANGED for {v.host}: the server now offers {v.key_type} key "
                f"{v.fingerprint}, not the one in {v.old_line or 'known_hosts'}{also}. Someone "
                "may be intercepting the connection, or the server was reinstalled",
                hint=f"if you know why it changed, remove the old key with "
                f"`{_keygen_remove(v.old_line, v.host)}` and connect again",
            )
        if self.declined:
            return HostKeyRejected(
                f"host key for {v.host} not accepted: {v.key_type} {v.fingerprint}"
            )
        return HostKeyRejected(
            f"host key for {v.host} is not known: {v.key_type} {v.fingerprint}",
            hint=f"check the fingerprint with the server's owner, then add it to "
            f"{self.user_files[0]} (for example by running pytunnel or ssh once on a "
            "terminal), or use -o StrictHostKeyChecking=accept-new",
        )


def _keygen_remove(where: str, host: str) -> str:
    """The ssh-keygen command that removes ``host``'s key from the file of ``where``
    ("path:line"): plain ``-R`` edits ~/.ssh/known_hosts only, so any other file is named."""
    path = where.rpartition(":")[0]
    default = os.path.expanduser(USER_KNOWN_HOSTS[0])
    if not path or os.path.abspath(path) == os.path.abspath(default):
        return f"ssh-keygen -R '{host}'"
    return f"ssh-keygen -f '{path}' -R '{host}'"

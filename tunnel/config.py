"""The tunnel's configuration: a frozen :class:`Config` and the parsers that build it.

Everything here is pure: no sockets, no files read. Bad input raises
:class:`~tunnel.errors.ConfigError` with a message that names the value and says what
form it should take.
"""

from __future__ import annotations

import difflib
import enum
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .rules import Route, Rules

DEFAULT_SSH_PORT = 22
DEFAULT_CONNECT_TIMEOUT = 15.0


class HostKeyPolicy(enum.Enum):
    """StrictHostKeyChecking, as in ssh_config(5)."""

    YES = "yes"
    NO = "no"
    ASK = "ask"
    ACCEPT_NEW = "accept-new"


class AddressFamily(enum.Enum):
    """AddressFamily, as in ssh_config(5); -4 and -6."""

    ANY = "any"
    INET = "inet"
    INET6 = "inet6"


AUTH_METHODS = ("publickey", "password", "keyboard-interactive")


@dataclass(frozen=True, slots=True)
class Forward:
    """One ``-D [bind_address:]port``. ``host`` None means loopback (127.0.0.1 and ::1),
    "" means every interface, anything else is bound as given."""

    host: str | None
    port: int

    def __str__(self) -> str:
        if self.host is None:
            return str(self.port)
        host = f"[{self.host}]" if ":" in self.host else (self.host or "*")
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{self.user}@{host}" if self.user else host
        return f"{text}:{self.port}" if self.port else text


@dataclass(frozen=True, slots=True)
class Config:
    destination: Destination
    forwards: tuple[Forward, ...] = ()
    # -R [bind_address:]port: SOCKS on the server's side, reaching this machine's network.
    reverse_forwards: tuple[Forward, ...] = ()
    # UDP ASSOCIATE: where DNS over TCP goes (None: where each query was sent), and
    # whether other UDP goes through a helper run on the server.
    dns_server: tuple[str, int] | None = None
    udp_helper: bool = False
    identities: tuple[str, ...] = ()
    # None: asyncssh's default (~/.ssh/config); () for "-F none".
    ssh_config: tuple[str, ...] | None = None
    # None where the command line said nothing: ssh_config, then the default decides.
    host_key_policy: HostKeyPolicy | None = None
    known_hosts: tuple[str, ...] | None = None
    global_known_hosts: tuple[str, ...] | None = None
    connect_timeout: float | None = None
    handshake_timeout: float = 30.0
    open_timeout: float = 30.0
    # ServerAliveInterval/CountMax: on by default, unlike asyncssh (None: not given, so
    # ssh_config or our default decides).
    keepalive_interval: float | None = None
    keepalive_count: int | None = None
    reconnect: bool = True
    retry_start: bool = False
    reconnect_wait: float = 10.0
    reconnect_cap: float = 60.0
    # --give-up-after: seconds one outage may last before a fatal error (None: forever).
    give_up_after: float | None = None
    max_connections: int = 4096
    # --connections: SSH connections to spread channels over.
    ssh_connections: int = 1
    drain: float = 0.0
    # Algorithm lists as ssh_config spells them (a list, or +, - or ^ edits of the
    # default): keys "ciphers", "kex", "host_key_algorithms", "macs".
    algorithms: Mapping[str, str] = field(default_factory=dict)
    compression: bool | None = None
    identities_only: bool | None = None
    # "publickey", "password", "keyboard-interactive" -> allowed or not.
    auth_methods: Mapping[str, bool] = field(default_factory=dict)
    preferred_auth: tuple[str, ...] | None = None
    batch_mode: bool | None = None
    # None where nothing said (ssh_config, then any, decides).
    address_family: AddressFamily | None = None
    gateway_ports: bool | None = None
    # -J / ProxyJump and ProxyCommand as given (None: not given, so ssh_config decides;
    # () and "none": none, which also keeps ssh_config's from applying).
    jump_hosts: tuple[Destination, ...] | None = None
    proxy_command: str | None = None
    # How the connection is reached, as apply_ssh_config resolves it: the jump hosts in
    # the order they are connected, each with its own settings, and the ProxyCommand to
    # run (tokens expanded) for the first connection of the chain.
    hops: tuple[Config, ...] = ()
    proxy_run: str | None = None
    rules: Rules = field(default_factory=Rules)
    # --route/--routes in the order given: first match wins, after --allow/--deny.
    routes: tuple[Route, ...] = ()
    # --proxy-auth: clients of the listeners must log in (SOCKS5 RFC 1929, HTTP Basic).
    proxy_credentials: tuple[bytes, bytes] | None = field(default=None, repr=False)
    allow_open_proxy: bool = False
    # --isolate: proxy users with different names never share an SSH connection; the
    # connection of a name closes after --isolate-idle seconds without one.
    isolate: bool = False
    isolate_idle: float = 300.0
    demo: bool = False
    options: Mapping[str, str] = field(default_factory=dict)
    # -S / ControlPath (tokens not yet expanded) and ControlMaster as given; explicit:
    # the path came from the command line, so a missing master is an error there.
    control_path: str | None = None
    control_master: str | None = None
    control_path_explicit: bool = False
    # --master-mode: how a channel through the master is opened (see tunnel.mux); where
    # handover cannot be had (not Linux), the master upstream opens stdio forwards.
    master_mode: str = "handover"


def parse_port(text: str, *, what: str = "port", allow_zero: bool = False) -> int:
    # ASCII digits only (str.isdecimal() takes any script's digits), and few of them.
    if not (text.isascii() and text.isdigit() and len(text.lstrip("0")) <= 5):
        raise ConfigError(f"bad {what} {text!r}: expected a number from 1 to 65535")
    port = int(text.lstrip("0") or "0")
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"bad {what} {text!r}: expected a number from {low} to 65535")
    return port


# -R's static forms, [bind_address:]port:host:hostport, which ssh does and pytunnel not.
_STATIC_FORWARD = re.compile(r"(?:(?:\[[^\]]*\]|[^:/]*)[:/])?\d+[:/](?:\[[^\]]*\]|[^:/]+)[:/]\d+")


def parse_reverse_forward(text: str) -> Forward:
    """``-R [bind_address:]port``: reverse dynamic forwarding. The static forms get a
    clear refusal rather than a puzzling parse error."""
    if _STATIC_FORWARD.fullmatch(text.strip()):
        raise ConfigError(
            f"bad -R {text!r}: pytunnel does reverse dynamic forwarding only, "
            "-R [bind_address:]port (for -R port:host:hostport use ssh)"
        )
    return parse_forward(text, flag="-R")


def parse_dns_server(text: str) -> tuple[str, int]:
    """``--dns-server HOST[:PORT]`` (``[v6]:port`` for IPv6), port 53 by default."""
    spec = text.strip()
    port_text: str | None
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "")
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
    else:
        host, port_text = spec, None
    # "" is a colon with no port after it: an error, as for -D and the destination.
    if port_text == "" or not host or not _is_host(host):
        raise ConfigError(f"bad --dns-server {text!r}: expected HOST[:PORT], such as 10.0.0.2")
    return host, parse_port(port_text, what="--dns-server port") if port_text else 53


def parse_forward(text: str, *, flag: str = "-D") -> Forward:
    """``[bind_address:]port`` as ssh(1) ``-D`` takes it: ``1080``, ``localhost:1080``,
    ``*:1080``, ``:1080``, ``[::1]:1080``, ``192.0.2.1:1080`` and ``host/1080``."""
    spec = text.strip()
    host: str | None
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0 or spec[close + 1 : close + 2] not in (":", "/"):
            raise ConfigError(f"bad {flag} {text!r}: expected [address]:port")
        host, port_text = spec[1:close], spec[close + 2 :]
    else:
        sep = max(spec.rfind(":"), spec.rfind("/"))
        if sep < 0:
            host, port_text = None, spec
        elif spec.count(":") > 1 and "/" not in spec:
            raise ConfigError(f"bad {flag} {text!r}: put an IPv6 address in brackets, [::1]:1080")
        else:
            host, port_text = spec[:sep], spec[sep + 1 :]
    try:
        port = parse_port(port_text, allow_zero=True)
    except ConfigError:
        raise ConfigError(
            f"bad {flag} {text!r}: expected a number from 0 to 65535 as the port, "
            "in [bind_address:]port"
        ) from None
    if host is not None:
        if host == "*":
            host = ""
        elif host and not _is_host(host):
            raise ConfigError(f"bad {flag} bind address {host!r}")
    return Forward(host, port)


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOSTNAME.fullmatch(text)) and len(text) <= 253
    return True


def parse_destination(text: str) -> Destination:
    """``[user@]host[:port]``, ``[user@][v6addr]:port`` or ``ssh://[user@]host[:port]``."""
    spec = text.strip()
    if spec.startswith("ssh://"):
        spec = spec.removeprefix("ssh://").rstrip("/")
    elif "://" in spec:
        raise ConfigError(f"bad destination {text!r}: only ssh:// URLs are understood")
    user: str | None = None
    if "@" in spec:
        user, _, spec = spec.rpartition("@")
        if not user:
            raise ConfigError(f"bad destination {text!r}: empty user name before '@'")
    port: int | None = None
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise ConfigError(f"bad destination {text!r}: missing ']'")
        host, rest = spec[1:close], spec[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad destination {text!r}: expected [address]:port")
            port = parse_port(rest[1:], what=f"port in {text!r}")
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
        port = parse_port(port_text, what=f"port in {text!r}")
    else:
        host = spec
    if not host or not _is_host(host):
        raise ConfigError(f"bad destination {text!r}: expected [user@]host[:port]")
    return Destination(host, user, port)


def parse_option(text: str) -> tuple[str, str]:
    """One ``-o`` argument: ``Key=Value``, ``Key Value`` or ``Key=Value`` with spaces."""
    match = re.match(r"^\s*([A-Za-z0-9]+)\s*(?:=\s*|\s+)(.*?)\s*$", text)
    if not match or not match.group(2):
        raise ConfigError(f"bad -o {text!r}: expected Key=Value")
    return match.group(1), match.group(2)


def parse_yes_no(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("yes", "true"):
        return True
    if lowered in ("no", "false"):
        return False
    raise ConfigError(f"bad value {value!r} for {key}: expected yes or no")


def parse_host_key_policy(value: str) -> HostKeyPolicy:
    lowered = value.lower()
    aliases = {"true": "yes", "false": "no", "off": "no", "on": "yes"}
    try:
        return HostKeyPolicy(aliases.get(lowered, lowered))
    except ValueError:
        raise ConfigError(
            f"bad value {value!r} for StrictHostKeyChecking: expected yes, no, ask or accept-new"
        ) from None


def parse_seconds(key: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(f"bad value {value!r} for {key}: expected a number of seconds > 0")
    return seconds


def parse_count(key: str, value: str, *, low: int = 0) -> int:
    if not (value.isascii() and value.isdigit() and len(value) <= 9) or int(value) < low:
        raise ConfigError(f"bad value {value!r} for {key}: expected a whole number >= {low}")
    return int(value)


def parse_interval(key: str, value: str) -> float:
    """Seconds where 0 means off (ServerAliveInterval)."""
    if value.strip() == "0":
        return 0.0
    try:
        return parse_seconds(key, value)
    except ConfigError:
        raise ConfigError(
            f"bad value {value!r} for {key}: expected a number of seconds, 0 for off"
        ) from None


def parse_address_family(value: str) -> AddressFamily:
    try:
        return AddressFamily(value.lower())
    except ValueError:
        raise ConfigError(
            f"bad value {value!r} for AddressFamily: expected any, inet or inet6"
        ) from None


def parse_algorithms(key: str, value: str) -> str:
    """A comma-separated list, optionally starting with +, - or ^ as ssh_config allows."""
    names = value.lstrip("+-^")
    if not names or any(not re.fullmatch(r"[A-Za-z0-9@._*?-]+", n) for n in names.split(",")):
        raise ConfigError(f"bad value {value!r} for {key}: expected a comma-separated list")
    return value


def parse_preferred_auth(value: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in value.split(",") if m.strip())
    known = {*AUTH_METHODS, "hostbased", "gssapi-with-mic", "gssapi-keyex"}
    unknown = [m for m in methods if m not in known]
    if not methods or unknown:
        raise ConfigError(
            f"bad value {value!r} for PreferredAuthentications: expected methods from "
            + ", ".join(AUTH_METHODS)
        )
    return methods


def parse_jump_hosts(value: str) -> tuple[Destination, ...]:
    """``-J`` / ProxyJump: ``[user@]host[:port][,...]``; ``none`` for no jump."""
    if value.strip().lower() == "none":
        return ()
    return tuple(parse_destination(hop) for hop in value.split(","))


def parse_proxy_command(value: str) -> str:
    """ProxyCommand: a shell command (kept as given, tokens and all), or ``none``."""
    command = value.strip()
    if not command:
        raise ConfigError("bad value '' for ProxyCommand: expected a command, or none")
    if command.lower() == "none":
        return "none"
    # Its tokens are filled in once the host is known; a bad one is refused now.
    expand_proxy_command(command, host="host", original_host="host", port=22, user="user")
    return command


# What ProxyCommand's %-tokens may put into a shell command line: ssh (since 9.6) refuses
# user and host names with shell metacharacters there, and so do we; nor may a value
# start with "-", where a command would take it for an option.
_SHELL_SAFE = re.compile(r"(?!-)[A-Za-z0-9_.:@%+-]*")


def expand_proxy_command(
    template: str, *, host: str, original_host: str, port: int, user: str
) -> str:
    """ProxyCommand's tokens as ssh expands them: %h the host name to connect to, %n the
    name as given, %p the port, %r the remote user, %% a literal %. Any other token is
    an error, as in ssh (which also takes %k, the host key alias: asyncssh, reading the
    same line, cannot)."""
    values = {"h": host, "n": original_host, "p": str(port), "r": user}
    parts: list[str] = []
    rest = template
    while "%" in rest:
        before, _, rest = rest.partition("%")
        parts.append(before)
        token, rest = rest[:1], rest[1:]
        if token == "%":
            parts.append("%")
        elif token in values:
            value = values[token]
            if not _SHELL_SAFE.fullmatch(value):
                raise ConfigError(
                    f"ProxyCommand {template!r}: %{token} would put {value!r} into a shell "
                    "command, and it has characters that are not safe there"
                )
            parts.append(value)
        else:
            what = f"unknown token %{token}" if token else "a lone % at the end"
            raise ConfigError(
                f"bad ProxyCommand {template!r}: {what}",
                hint="ProxyCommand takes %h, %n, %p, %r, and %% for a literal %",
            )
    parts.append(rest)
    return "".join(parts)


CONTROL_MASTER_VALUES = ("yes", "no", "ask", "auto", "autoask")


def parse_control_master(value: str) -> str:
    lowered = value.lower()
    if lowered not in CONTROL_MASTER_VALUES:
        raise ConfigError(
            f"bad value {value!r} for ControlMaster: expected one of "
            + ", ".join(CONTROL_MASTER_VALUES)
        )
    return lowered


def parse_control_path(value: str) -> str:
    if not value:
        raise ConfigError("ControlPath needs a path (or none)")
    return value


def control_path_hash(local_host: str, host: str, port: int, user: str) -> str:
    """ssh's %C: the SHA-1 of %l%h%p%r in hex (ssh_connection_hash in OpenSSH)."""
    import hashlib

    return hashlib.sha1(f"{local_host}{host}{port}{user}".encode()).hexdigest()


def expand_control_path(
    template: str,
    *,
    host: str,
    original_host: str,
    port: int,
    user: str,
    local_host: str,
    local_user: str,
    home: str,
    uid: int,
) -> str:
    """ControlPath's tokens as ssh expands them: %h is the host name to connect to in
    lower case, %n the one given, %L the local host name up to its first dot."""
    host = host.lower()
    values = {
        "h": host,
        "n": original_host,
        "p": str(port),
        "r": user,
        "l": local_host,
        "L": local_host.split(".", 1)[0],
        "u": local_user,
        "d": home,
        "i": str(uid),
        "C": control_path_hash(local_host, host, port, user),
        "%": "%",
    }
    out: list[str] = []
    i = 0
    while i < len(template):
        char = template[i]
        if char != "%":
            out.append(char)
            i += 1
            continue
        token = template[i + 1 : i + 2]
        if token not in values:
            what = f"unknown token %{token}" if token else "a lone % at the end"
            raise ConfigError(
                f"bad ControlPath {template!r}: {what}",
                hint="ControlPath takes %h %p %r %C %L %l %u %n %d %i and %%",
            )
        out.append(values[token])
        i += 2
    path = "".join(out)
    if path.startswith("~/") or path == "~":
        path = home + path[1:]
    return path


def split_paths(value: str) -> tuple[str, ...]:
    return tuple(value.split())


# Names that always mean this machine's loopback, with the addresses a -D on them binds:
# these literals, never a lookup, so that /etc/hosts or a resolver cannot turn a name the
# open-proxy guard let through into another address. "localhost" binds both families,
# as ssh -D localhost:PORT does.
LOOPBACK_NAMES: dict[str, tuple[str, ...]] = {
    "localhost": ("127.0.0.1", "::1"),
    "ip6-localhost": ("::1",),
    "ip6-loopback": ("::1",),
}


def literal_forward(forward: Forward) -> Forward:
    """A -D whose bind address is a loopback name (any case), as the literal it means:
    None (127.0.0.1 and ::1) for localhost, ``::1`` for the IPv6 names."""
    if forward.host is None:
        return forward
    addresses = LOOPBACK_NAMES.get(forward.host.lower())
    if addresses is None:
        return forward
    return Forward(None if len(addresses) > 1 else addresses[0], forward.port)


def is_loopback_address(host: str) -> bool:
    """Whether an address as a socket reports it (``sockname``) is loopback. Names and
    anything unparsable are not: only what was actually bound counts."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    # ::ffff:127.0.0.1 is 127.0.0.1 (Python before 3.13 says it is not loopback).
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_loopback_forward(forward: Forward) -> bool:
    """Whether a listener can only be reached from this machine."""
    if forward.host is None or forward.host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(forward.host).is_loopback
    except ValueError:
        return False  # "" (every interface) or a name: reachable from elsewhere


def open_proxy_forwards(config: Config) -> list[str]:
    """Listeners that would serve anyone who can reach them, with no password: -D here,
    and -R on the server (which reach into this machine's network)."""
    if config.proxy_credentials is not None or config.allow_open_proxy:
        return []
    return [f"-D {f}" for f in config.forwards if not is_loopback_forward(f)] + [
        f"-R {f}" for f in config.reverse_forwards if not is_loopback_forward(f)
    ]


def merge_forwards(forwards: Iterable[Forward]) -> tuple[Forward, ...]:
    """Drop exact repeats, keep order (``-D 1080 -D 1080`` is one listener)."""
    return tuple(dict.fromkeys(forwards))


# LogLevel -> the -v count it means (-1 for quiet).
LOG_LEVELS = {
    "QUIET": -1,
    "FATAL": -1,
    "ERROR": -1,
    "INFO": 0,
    "VERBOSE": 1,
    "DEBUG": 2,
    "DEBUG1": 2,
    "DEBUG2": 3,
    "DEBUG3": 3,
}


def parse_log_level(value: str) -> int:
    try:
        return LOG_LEVELS[value.upper()]
    except KeyError:
        raise ConfigError(
            f"bad value {value!r} for LogLevel: expected one of " + ", ".join(LOG_LEVELS)
        ) from None


class FromFile(enum.Enum):
    """How a key's ssh_config value reaches the tunnel."""

    # apply_ssh_config sets the field where the command line left it open.
    MERGED = "merged"
    # asyncssh reads it when it connects (HostName, User, Port): the Host and Match
    # blocks must keep matching the destination as given, so it is not copied into it.
    AT_CONNECT = "at connect"
    # Checked in ssh_config, used from -o only (LogLevel: logging is set up before
    # ssh_config is read; ExitOnForwardFailure: pytunnel always exits).
    CHECKED_ONLY = "checked only"


@dataclass(frozen=True, slots=True)
class OptionKey:
    """One ssh option pytunnel understands, for ``-o KEY=VALUE`` and ssh_config alike:
    the field it sets, the parser that checks and converts its value (the same for
    both), and its default and meaning (the man page and completions come from these)."""

    name: str
    # The key in apply_options' result: a Config field, or one build_config folds into
    # another (user, port and hostname into the destination; log_level into -v).
    field: str
    parse: Callable[[str], object]
    default: str
    help: str
    # Every value adds (IdentityFile, DynamicForward); otherwise the first one wins.
    repeatable: bool = False
    # The field is a mapping, and this key sets its entry ``item`` (auth methods,
    # algorithm lists).
    item: str | None = None
    # Keys with the same slot compete: whichever is given first wins, and later values of
    # any of them are only checked (ProxyJump and ProxyCommand, ssh_config(5)).
    slot: str | None = None
    from_file: FromFile = FromFile.MERGED
    # In ssh_config, ``KEY none`` is the first value but sets nothing (the file's
    # default stays), as asyncssh and earlier pytunnel read these lines.
    none_unsets: bool = False
    # ssh_config lines of this key that belong to other tools and are passed over (a
    # shared file's static RemoteForward is ssh's, not a reverse dynamic one).
    file_skips: Callable[[str], bool] | None = None

    def setter(self, values: dict[str, Any], value: str) -> None:
        """Put one value into ``values`` (apply_options' result), as the key says."""
        parsed = self.parse(value)
        if self.repeatable:
            values.setdefault(self.field, []).append(parsed)
        elif self.item is not None:
            values.setdefault(self.field, {})[self.item] = parsed
        elif self.slot is not None:
            if not any(k.field in values for k in OPTION_KEYS.values() if k.slot == self.slot):
                values[self.field] = parsed
        else:
            values[self.field] = parsed


def _yes_no(key: str) -> Callable[[str], bool]:
    return lambda value: parse_yes_no(key, value)


# Every ssh option pytunnel understands, for -o and ssh_config both (apply_options here,
# apply_ssh_config in sshconfig.py read only this table). To support another option, add
# ONE row: its ssh_config name, the field it sets, the parser that checks its value, its
# default and help; both readers, the man page and the completions follow. Its Config
# field defaults to None (an empty tuple or mapping for repeatable and ``item`` keys), so
# that ssh_config fills it only where the command line left it open. Keys are matched
# case-insensitively, as ssh does.
OPTION_KEYS: dict[str, OptionKey] = {
    key.name.lower(): key
    for key in (
        OptionKey(
            "StrictHostKeyChecking",
            "host_key_policy",
            parse_host_key_policy,
            "ask",
            "ask: ask about unknown host keys on a terminal, refuse them without one; yes: "
            "refuse unknown and changed keys; accept-new: record unknown keys, refuse "
            "changed ones; no: the same as accept-new (changed and revoked keys are always "
            "refused)",
        ),
        OptionKey(
            "UserKnownHostsFile",
            "known_hosts",
            split_paths,
            "~/.ssh/known_hosts ~/.ssh/known_hosts2",
            "known_hosts files to check (and to add accepted keys to, the first one)",
            none_unsets=True,
        ),
        OptionKey(
            "GlobalKnownHostsFile",
            "global_known_hosts",
            split_paths,
            "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2",
            "system-wide known_hosts files",
            none_unsets=True,
        ),
        OptionKey(
            "ConnectTimeout",
            "connect_timeout",
            lambda v: parse_seconds("ConnectTimeout", v),
            "15",
            "seconds to wait for the SSH connection and login",
        ),
        OptionKey(
            "Port",
            "port",
            lambda v: parse_port(v, what="Port"),
            "22",
            "SSH port",
            from_file=FromFile.AT_CONNECT,
        ),
        OptionKey(
            "User",
            "user",
            str,
            "the local user",
            "user to log in as",
            from_file=FromFile.AT_CONNECT,
        ),
        OptionKey(
            "IdentityFile",
            "identities",
            str,
            "~/.ssh/id_*",
            "private key file to authenticate with",
            repeatable=True,
        ),
        OptionKey(
            "DynamicForward",
            "forwards",
            parse_forward,
            "none",
            "[bind_address:]port to serve SOCKS on, as -D",
            repeatable=True,
        ),
        OptionKey(
            "RemoteForward",
            "reverse_forwards",
            parse_reverse_forward,
            "none",
            "[bind_address:]port for the server to serve SOCKS on, as -R",
            repeatable=True,
            # Only one-field lines are reverse dynamic ones; the static kind (port
            # host:hostport), common in a config shared with ssh, is ssh's.
            file_skips=lambda value: len(value.split()) != 1,
        ),
        OptionKey(
            "ServerAliveInterval",
            "keepalive_interval",
            lambda v: parse_interval("ServerAliveInterval", v),
            "15",
            "seconds between keepalive requests when the server is quiet (0: off)",
        ),
        OptionKey(
            "ServerAliveCountMax",
            "keepalive_count",
            lambda v: parse_count("ServerAliveCountMax", v, low=1),
            "3",
            "unanswered keepalives before the session counts as lost",
        ),
        OptionKey(
            "HostName",
            "hostname",
            lambda v: parse_destination(v).host,
            "the destination",
            "real host name to connect to",
            from_file=FromFile.AT_CONNECT,
        ),
        OptionKey(
            "IdentitiesOnly",
            "identities_only",
            _yes_no("IdentitiesOnly"),
            "no",
            "use only the identity files given, not every key the agent holds",
        ),
        OptionKey(
            "ProxyJump",
            "jump_hosts",
            parse_jump_hosts,
            "none",
            "[user@]host[:port][,...] jump hosts to reach the server through, as -J",
            slot="proxy",
        ),
        OptionKey(
            "ProxyCommand",
            "proxy_command",
            parse_proxy_command,
            "none",
            "shell command whose stdin and stdout reach the server (%h host, %p port, "
            "%r user, %n name as given, %% a %); ProxyJump and ProxyCommand: the first "
            "given wins",
            slot="proxy",
        ),
        OptionKey(
            "BatchMode",
            "batch_mode",
            _yes_no("BatchMode"),
            "no",
            "never ask for a password, passphrase or host-key confirmation",
        ),
        *(
            OptionKey(
                key,
                "auth_methods",
                _yes_no(key),
                "yes",
                f"allow {method} authentication",
                item=method,
            )
            for key, method in (
                ("PubkeyAuthentication", "publickey"),
                ("PasswordAuthentication", "password"),
                ("KbdInteractiveAuthentication", "keyboard-interactive"),
            )
        ),
        OptionKey(
            "PreferredAuthentications",
            "preferred_auth",
            parse_preferred_auth,
            "publickey,keyboard-interactive,password",
            "the order to try authentication methods in",
        ),
        OptionKey(
            "Compression",
            "compression",
            _yes_no("Compression"),
            "no",
            "compress the SSH connection, as -C",
        ),
        *(
            OptionKey(
                key,
                "algorithms",
                functools.partial(parse_algorithms, key),
                "asyncssh's list",
                help,
                item=item,
            )
            for key, item, help in (
                ("Ciphers", "ciphers", "ciphers, in order of preference (+, - or ^ edit)"),
                ("KexAlgorithms", "kex", "key exchange algorithms"),
                ("HostKeyAlgorithms", "host_key_algorithms", "host key algorithms"),
                ("MACs", "macs", "message authentication codes"),
            )
        ),
        OptionKey(
            "AddressFamily",
            "address_family",
            parse_address_family,
            "any",
            "any, inet (IPv4 only, as -4) or inet6 (IPv6 only, as -6) for the SSH connection",
        ),
        OptionKey(
            "GatewayPorts",
            "gateway_ports",
            _yes_no("GatewayPorts"),
            "no",
            "let -D without an address listen on every interface, as -g",
        ),
        OptionKey(
            "ExitOnForwardFailure",
            "exit_on_forward_failure",
            _yes_no("ExitOnForwardFailure"),
            "yes",
            "accepted for compatibility: pytunnel always exits (status 3) when a listener "
            "cannot be bound",
            from_file=FromFile.CHECKED_ONLY,
        ),
        OptionKey(
            "ControlPath",
            "control_path",
            parse_control_path,
            "none",
            "an OpenSSH master's socket to ride instead of logging in, as -S (tokens "
            "%h %p %r %C %L %l %u %n %d %i %%)",
        ),
        OptionKey(
            "ControlMaster",
            "control_master",
            parse_control_master,
            "no",
            "auto or autoask: without a master at ControlPath, log in as usual; no: a "
            "missing master is an error (pytunnel never becomes a master itself)",
        ),
        OptionKey(
            "LogLevel",
            "log_level",
            parse_log_level,
            "INFO",
            "QUIET, FATAL, ERROR (as -q), INFO, VERBOSE (as -v), DEBUG, DEBUG1-3 (as -vv, -vvv)",
            from_file=FromFile.CHECKED_ONLY,
        ),
    )
}


# Every keyword of ssh_config(5) (OpenSSH 9.2, `man 5 ssh_config`), lower-cased, with the
# old names ssh still reads (readconf.c): a config shared with ssh may use any of them,
# and pytunnel stays silent about the ones it does not use. Anything else ssh refuses.
SSH_CONFIG_KEYWORDS = frozenset(
    key.lower()
    for key in (
        "AddKeysToAgent",
        "AddressFamily",
        "BatchMode",
        "BindAddress",
        "BindInterface",
        "CASignatureAlgorithms",
        "CanonicalDomains",
        "CanonicalizeFallbackLocal",
        "CanonicalizeHostname",
        "CanonicalizeMaxDots",
        "CanonicalizePermittedCNAMEs",
        "CertificateFile",
        "CheckHostIP",
        "Ciphers",
        "ClearAllForwardings",
        "Compression",
        "ConnectTimeout",
        "ConnectionAttempts",
        "ControlMaster",
        "ControlPath",
        "ControlPersist",
        "DynamicForward",
        "EnableEscapeCommandline",
        "EnableSSHKeysign",
        "EscapeChar",
        "ExitOnForwardFailure",
        "FingerprintHash",
        "ForkAfterAuthentication",
        "ForwardAgent",
        "ForwardX11",
        "ForwardX11Timeout",
        "ForwardX11Trusted",
        "GSSAPIAuthentication",
        "GSSAPIClientIdentity",
        "GSSAPIDelegateCredentials",
        "GSSAPIKexAlgorithms",
        "GSSAPIKeyExchange",
        "GSSAPIRenewalForcesRekey",
        "GSSAPIServerIdentity",
        "GSSAPITrustDns",
        "GatewayPorts",
        "GlobalKnownHostsFile",
        "HashKnownHosts",
        "Host",
        "HostKeyAlgorithms",
        "HostKeyAlias",
        "HostbasedAcceptedAlgorithms",
        "HostbasedAuthentication",
        "Hostname",
        "IPQoS",
        "IdentitiesOnly",
        "IdentityAgent",
        "IdentityFile",
        "IgnoreUnknown",
        "Include",
        "KbdInteractiveAuthentication",
        "KbdInteractiveDevices",
        "KexAlgorithms",
        "KnownHostsCommand",
        "LocalCommand",
        "LocalForward",
        "LogLevel",
        "LogVerbose",
        "MACs",
        "Match",
        "NoHostAuthenticationForLocalhost",
        "NumberOfPasswordPrompts",
        "PKCS11Provider",
        "PasswordAuthentication",
        "PermitLocalCommand",
        "PermitRemoteOpen",
        "Port",
        "PreferredAuthentications",
        "ProxyCommand",
        "ProxyJump",
        "ProxyUseFdpass",
        "PubkeyAcceptedAlgorithms",
        "PubkeyAuthentication",
        "RekeyLimit",
        "RemoteCommand",
        "RemoteForward",
        "RequestTTY",
        "RequiredRSASize",
        "RevokedHostKeys",
        "SecurityKeyProvider",
        "SendEnv",
        "ServerAliveCountMax",
        "ServerAliveInterval",
        "SessionType",
        "SetEnv",
        "StdinNull",
        "StreamLocalBindMask",
        "StreamLocalBindUnlink",
        "StrictHostKeyChecking",
        "SyslogFacility",
        "TCPKeepAlive",
        "Tunnel",
        "TunnelDevice",
        "UpdateHostKeys",
        "User",
        "UserKnownHostsFile",
        "VerifyHostKeyDNS",
        "VisualHostKey",
        "XAuthLocation",
        # Old names ssh still accepts.
        "ChallengeResponseAuthentication",
        "PubkeyAcceptedKeyTypes",
        "HostbasedKeyTypes",
        "KeepAlive",
        "DSAAuthentication",
    )
)


def option_key_hint(key: str) -> str:
    """For an unknown key: the closest supported one, if any is close, and where the
    whole list is (it is too long for one line)."""
    where = "see `man pytunnel` for the supported keys"
    if key.lower() in SSH_CONFIG_KEYWORDS:
        # ssh's own key: it exists, pytunnel just does not use it; a near name would mislead.
        return f"{key} is an ssh option pytunnel does not use; {where}"
    close = difflib.get_close_matches(key.lower(), OPTION_KEYS, n=1, cutoff=0.6)
    return f"did you mean {OPTION_KEYS[close[0]].name}? {where}" if close else where


def apply_options(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse every ``-o``; like ssh, the first value given for a key wins."""
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for text in pairs:
        key, value = parse_option(text)
        entry = OPTION_KEYS.get(key.lower())
        if entry is None:
            raise ConfigError(f"-o {key}: unsupported option", hint=option_key_hint(key))
        # Like ssh, the first value of a key wins, but a later one must still be valid.
        target = {} if entry.name in seen and not entry.repeatable else values
        seen.add(entry.name)
        try:
            entry.setter(target, value)
        except ConfigError as exc:
            if entry.name in exc.message:
                raise
            raise ConfigError(f"-o {entry.name}: {exc.message}", hint=exc.hint) from exc
    return values

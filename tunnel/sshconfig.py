"""ssh_config: the files read as ssh reads them (Host and Match blocks, Include, the
first value wins), mapped onto :class:`tunnel.config.Config`, and the route to the server
(ProxyJump hosts, each with its own block, or the ProxyCommand to run).

The parsing itself is asyncssh's (``asyncssh.config``, its ssh_config reader only: no
connection, no keys); nothing else of asyncssh is used here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import getpass
import glob
import logging
import os
from typing import Any, cast

from asyncssh.config import ConfigParseError, SSHClientConfig, SSHConfig

from .config import (
    DEFAULT_SSH_PORT,
    SSH_CONFIG_KEYWORDS,
    Config,
    Destination,
    expand_proxy_command,
    merge_forwards,
    parse_control_master,
    parse_control_path,
    parse_forward,
    parse_host_key_policy,
    parse_jump_hosts,
    parse_proxy_command,
    parse_reverse_forward,
)
from .errors import ConfigError

log = logging.getLogger(__name__)


def _append_whole_line(config: SSHConfig, option: str, args: list[str]) -> None:
    """Keep every argument of a repeatable line (``RemoteForward 8080 web:80`` is two)."""
    value = " ".join(args)
    args.clear()
    if value.lower() != "none":
        values: list[str] = config._options.setdefault(option, [])  # type: ignore[assignment]
        values.append(value)


def _proxy_line(config: SSHConfig, option: str, args: list[str]) -> None:
    """ProxyJump and ProxyCommand compete for one slot: the first line of either wins,
    ``none`` included (ssh_config(5)). The value is kept as written: ProxyCommand's
    tokens are expanded later, ssh's way, not with asyncssh's wider set."""
    # asyncssh hands ProxyCommand over as the rest of the line, "=" included if used.
    value = " ".join(args).strip().removeprefix("=").strip()
    args.clear()
    if "Proxy" not in config._options:
        config._options["Proxy"] = (option, value)


class _FileConfig(SSHClientConfig):
    """asyncssh's ssh_config reader (Host and Match matching, Include, first value wins)
    that also keeps the keys asyncssh has no use for but a tunnel does."""

    _handlers = {  # noqa: RUF012 (asyncssh declares it as a plain attribute)
        **SSHClientConfig._handlers,
        **{
            option.lower(): (option, handler)
            for option, handler in (
                ("DynamicForward", SSHConfig._append_string),
                ("RemoteForward", _append_whole_line),
                ("StrictHostKeyChecking", SSHConfig._set_string),
                ("BatchMode", SSHConfig._set_bool),
                ("GatewayPorts", SSHConfig._set_bool),
                ("ExitOnForwardFailure", SSHConfig._set_bool),
                ("ProxyJump", _proxy_line),
                ("ProxyCommand", _proxy_line),
                ("ControlPath", SSHConfig._set_string),
                ("ControlMaster", SSHConfig._set_string),
            )
        },
    }


def _config_paths(config: Config) -> list[str]:
    if config.ssh_config is not None:
        return list(config.ssh_config)
    default = os.path.expanduser("~/.ssh/config")
    return [default] if os.access(default, os.R_OK) else []


def host_key_alias(config: Config, dest: Destination) -> str | None:
    """ssh_config's HostKeyAlias for one destination, read from the files asyncssh reads
    (it looks the key up under the alias; we must know it to file it without a port)."""
    paths = _config_paths(config)
    if not paths:
        return None
    try:
        loaded = _read(paths, dest)
    except (OSError, ConfigParseError):
        return None  # asyncssh meets the same error when it connects, and reports it
    alias = loaded.get("HostKeyAlias")
    return alias if isinstance(alias, str) else None


def connect_target(config: Config, dest: Destination) -> tuple[str, int, str | None]:
    """Where asyncssh will connect for ``dest``, as it reads ssh_config: the host name
    (HostName), the port (-p, Port, or 22) and the user (if any is set), for -v."""
    paths = _config_paths(config)
    loaded = None
    if paths:
        try:
            loaded = _FileConfig.load(
                None, paths, False, False, False, getpass.getuser(),
                dest.user or (), dest.host, dest.port or (),
            )  # fmt: skip
        except (OSError, ConfigParseError):
            loaded = None  # reported when the connection reads it

    def get(option: str) -> Any:
        return loaded.get(option) if loaded is not None else None

    host = str(get("Hostname") or dest.host)
    port = int(dest.port or get("Port") or DEFAULT_SSH_PORT)
    user = dest.user or get("User")
    return host, port, None if user is None else str(user)


def resolve_control_path(config: Config) -> str | None:
    """The ControlPath of ``config`` (after :func:`apply_ssh_config`) with its tokens
    expanded for the destination as asyncssh will reach it; None without one."""
    if config.control_path is None or config.control_path.lower() == "none":
        return None
    import socket

    from .config import expand_control_path

    host, port, user = connect_target(config, config.destination)
    local_user = getpass.getuser()
    return expand_control_path(
        config.control_path,
        host=host,
        original_host=config.destination.host,
        port=port,
        user=user or local_user,
        local_host=socket.gethostname(),
        local_user=local_user,
        home=os.path.expanduser("~"),
        uid=os.getuid(),
    )


def apply_ssh_config(config: Config) -> Config:
    """Fill what the command line left open from ssh_config, for the destination host.
    The command line wins; ``DynamicForward`` lines add listeners, as in ssh. The route
    is resolved too: the jump hosts (each one's own ssh_config applied to it) and the
    ProxyCommand to run."""
    paths = _config_paths(config)
    for where, keyword in unknown_keywords(paths):
        # ssh refuses the whole file for these; asyncssh skips them without a word. A
        # typo (HostNmae) would silently change where we connect: say so, and go on.
        log.warning("%s: unknown ssh_config keyword %s (ssh refuses it; ignored)", where, keyword)
    return _resolve(config, paths, ())


def unknown_keywords(paths: list[str]) -> list[tuple[str, str]]:
    """The lines of these files (and the files they Include) whose keyword is none of
    ssh_config(5)'s, as ("path line N", keyword), in file order. Keywords the file
    lists in IgnoreUnknown before them are left out, as ssh leaves them out."""
    found: list[tuple[str, str]] = []
    ignored: list[str] = []

    def scan(path: str, depth: int) -> None:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines = handle.read().splitlines()
        except OSError:
            return  # reading it for real reports the error
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.replace("=", " ", 1).partition(" ")
            lowered = keyword.lower()
            if lowered == "ignoreunknown":
                ignored.extend(p.strip().lower() for p in rest.replace(",", " ").split())
            elif lowered == "include" and depth < 16:
                for pattern in rest.split():
                    pattern = os.path.expanduser(pattern)
                    if not os.path.isabs(pattern):
                        pattern = os.path.join(os.path.expanduser("~/.ssh"), pattern)
                    for included in sorted(glob.glob(pattern)):
                        scan(included, depth + 1)
            elif lowered not in SSH_CONFIG_KEYWORDS and not any(
                fnmatch.fnmatchcase(lowered, p) for p in ignored
            ):
                found.append((f"{path} line {number}", keyword))

    for path in paths:
        scan(path, 0)
    return found


def _read(paths: list[str], dest: Destination) -> SSHConfig:
    """The ssh_config blocks for ``dest``, as asyncssh reads them when it connects."""
    return _FileConfig.load(
        None,
        paths,
        False,
        False,
        False,
        getpass.getuser(),
        dest.user or (),
        dest.host,
        dest.port or (),
    )


def _load(config: Config, paths: list[str]) -> SSHConfig:
    try:
        return _read(paths, config.destination)
    except OSError as exc:
        name = exc.filename or " ".join(paths)
        raise ConfigError(f"cannot read ssh_config {name}: {exc.strerror or exc}") from exc
    except ConfigParseError as exc:
        raise ConfigError(f"in ssh_config: {exc}") from exc


def _resolve(config: Config, paths: list[str], chain: tuple[str, ...]) -> Config:
    """``config`` (the command line's) with ssh_config merged in for its destination, and
    its route. ``chain``: the hosts whose ProxyJump led here, to refuse a loop."""
    dest = config.destination
    if str(dest) in chain:
        raise ConfigError(f"in ssh_config: ProxyJump loop: {' -> '.join((*chain, str(dest)))}")
    loaded = _load(config, paths) if paths else None
    merged = _merge(config, loaded) if loaded is not None else config
    # The route: the command line first (-J, -o ProxyJump or -o ProxyCommand), then the
    # first ProxyJump or ProxyCommand line of the file.
    jumps: tuple[Destination, ...] = ()
    command: str | None = None
    # Only the file's ProxyJump lines can lead back to a host already on the way.
    here = chain
    if config.jump_hosts is not None:
        jumps = config.jump_hosts
    elif config.proxy_command is not None:
        command = config.proxy_command
    elif loaded is not None and loaded.get("Proxy") is not None:
        option, value = cast(tuple[str, str], loaded.get("Proxy"))
        try:
            if option == "ProxyJump":
                jumps = parse_jump_hosts(value)
                here = (*chain, str(dest))
            else:
                command = parse_proxy_command(value)
        except ConfigError as exc:
            what = "" if option in exc.message else f"{option} {value!r}: "
            raise ConfigError(f"in ssh_config: {what}{exc.message}", hint=exc.hint) from exc
    if jumps:
        # As ssh runs `ssh -J j1,...,jn-1 jn`: the first jump host's own ssh_config
        # route applies to it, the later ones go through the earlier ones. Only the
        # command line's options (not the destination's file settings) go with them.
        base = dataclasses.replace(
            config, jump_hosts=None, proxy_command=None, forwards=(), reverse_forwards=()
        )
        first = _resolve(dataclasses.replace(base, destination=jumps[0]), paths, here)
        later = [
            _resolve(dataclasses.replace(base, destination=hop, jump_hosts=()), paths, here)
            for hop in jumps[1:]
        ]
        hops = (*first.hops, dataclasses.replace(first, hops=()), *later)
        return dataclasses.replace(merged, hops=hops, proxy_run=None)
    if command is None or command == "none":
        return merged

    def get(option: str) -> Any:
        return loaded.get(option) if loaded is not None else None

    run = expand_proxy_command(
        command,
        host=str(get("Hostname") or dest.host),
        original_host=dest.host,
        port=int(dest.port or get("Port") or DEFAULT_SSH_PORT),
        user=str(dest.user or get("User") or getpass.getuser()),
    )
    return dataclasses.replace(merged, proxy_command=command, proxy_run=run)


def _merge(config: Config, loaded: SSHConfig) -> Config:
    """The settings of the file that the command line left open."""

    def get(option: str) -> Any:
        return loaded.get(option)

    changes: dict[str, Any] = {}
    forwards = get("DynamicForward") or []
    # Only one-field RemoteForward lines are reverse dynamic ones; the static kind
    # (port host:hostport), common for other tools in a shared config, is ssh's.
    reverse = [text for text in get("RemoteForward") or [] if len(text.split()) == 1]
    try:
        if forwards:
            changes["forwards"] = merge_forwards(
                [*config.forwards, *(parse_forward(text) for text in forwards)]
            )
        if reverse:
            changes["reverse_forwards"] = merge_forwards(
                [*config.reverse_forwards, *(parse_reverse_forward(text) for text in reverse)]
            )
        if config.control_path is None and get("ControlPath") is not None:
            changes["control_path"] = parse_control_path(get("ControlPath"))
        if config.control_master is None and get("ControlMaster") is not None:
            changes["control_master"] = parse_control_master(get("ControlMaster"))
        if config.host_key_policy is None and get("StrictHostKeyChecking") is not None:
            changes["host_key_policy"] = parse_host_key_policy(get("StrictHostKeyChecking"))
    except ConfigError as exc:
        raise ConfigError(f"in ssh_config: {exc.message}") from exc
    simple = {
        "batch_mode": "BatchMode",
        "gateway_ports": "GatewayPorts",
        "compression": "Compression",
        "keepalive_interval": "ServerAliveInterval",
        "keepalive_count": "ServerAliveCountMax",
        "connect_timeout": "ConnectTimeout",
    }
    for field, option in simple.items():
        if getattr(config, field) is None and get(option) is not None:
            changes[field] = get(option)
    for field, option in (
        ("known_hosts", "UserKnownHostsFile"),
        ("global_known_hosts", "GlobalKnownHostsFile"),
    ):
        if getattr(config, field) is None and get(option):
            changes[field] = tuple(get(option))
    files = [f for f in get("IdentityFile") or [] if f not in config.identities]
    if files:
        # As ssh: -i files come first, then the config's; both are offered.
        changes["identities"] = (*config.identities, *files)
    if "ciphers" not in config.algorithms and get("Ciphers"):
        changes["algorithms"] = {**config.algorithms, "ciphers": get("Ciphers")}
    return dataclasses.replace(config, **changes) if changes else config

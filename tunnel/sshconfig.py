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
from collections.abc import Callable
from typing import Any, cast

from asyncssh.config import ConfigParseError, SSHClientConfig, SSHConfig

from .config import (
    DEFAULT_SSH_PORT,
    OPTION_KEYS,
    SSH_CONFIG_KEYWORDS,
    Config,
    Destination,
    FromFile,
    OptionKey,
    expand_proxy_command,
)
from .errors import ConfigError

log = logging.getLogger(__name__)


def _table_line(key: OptionKey) -> Callable[[SSHConfig, str, list[str]], None]:
    """The reader of one table key's lines: the value checked by the key's own parser
    (the one -o uses; an error names the file and line) and kept as parsed, the first
    value winning unless the key is repeatable, as ssh reads the file."""

    def handler(config: SSHConfig, option: str, args: list[str]) -> None:
        # The whole line: "RemoteForward 8080 web:80" is two arguments, and a ProxyCommand
        # comes as the rest of the line ("=" included if used).
        value = " ".join(args).strip().removeprefix("=").strip()
        args.clear()
        options: dict[str, object] = config._options
        if key.repeatable:
            if value.lower() == "none" or (key.file_skips is not None and key.file_skips(value)):
                return
            parsed = _checked(config, key, value)
            cast(list[object], options.setdefault(option, [])).append(parsed)
            return
        if key.none_unsets and value.lower() == "none":
            options.setdefault(option, None)
            return
        parsed = _checked(config, key, value)
        if key.slot is not None:
            # Keys of one slot compete for it: the first line of any of them wins, "none"
            # included (ssh_config(5)); kept as written, its tokens expanded later.
            options.setdefault(_slot(key.slot), (key.name, value))
        else:
            options.setdefault(option, parsed)

    return handler


def _connect_line(key: OptionKey) -> Callable[[SSHConfig, str, list[str]], None]:
    """The reader of a key asyncssh resolves when it connects: asyncssh's own (tokens,
    Match), the value checked by the table's parser as -o checks it."""
    _, read = SSHClientConfig._handlers[key.name.lower()]

    def handler(config: SSHConfig, option: str, args: list[str]) -> None:
        first = option not in config._options
        if len(args) == 1 and "%" not in args[0]:
            _checked(config, key, args[0])
        read(config, option, args)
        if first and option in config._options:
            # HostName's tokens are expanded as it is read: check what they made.
            _checked(config, key, str(config._options[option]))

    return handler


def _checked(config: SSHConfig, key: OptionKey, value: str) -> object:
    try:
        return key.parse(value)
    except ConfigError as exc:
        # As for -o: the key and the value written, unless the message names them.
        what = "" if key.name in exc.message else f"{key.name} {value!r}: "
        config._error(f"{what}{exc.message}")


def _slot(name: str) -> str:
    return f"pytunnel slot {name}"


class _FileConfig(SSHClientConfig):
    """asyncssh's ssh_config reader (Host and Match matching, Include, first value wins)
    that reads the keys of pytunnel's option table with the table's own parsers. The
    keys asyncssh resolves when it connects (HostName, User, Port) keep its readers,
    their values checked by the table's."""

    _handlers = {  # noqa: RUF012 (asyncssh declares it as a plain attribute)
        **SSHClientConfig._handlers,
        **{
            # asyncssh's spelling (Hostname) for its keys: it reads them back by it.
            name: (
                (SSHClientConfig._handlers[name][0], _connect_line(key))
                if key.from_file is FromFile.AT_CONNECT
                else (key.name, _table_line(key))
            )
            for name, key in OPTION_KEYS.items()
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
    elif loaded is not None and loaded.get(_slot("proxy")) is not None:
        option, value = cast(tuple[str, str], loaded.get(_slot("proxy")))
        # Checked when the line was read; parsed again here, as it was written.
        route = OPTION_KEYS[option.lower()].parse(value)
        if isinstance(route, tuple):
            jumps = route
            here = (*chain, str(dest))
        else:
            command = str(route)
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
    """The settings of the file that the command line left open, key by key as the option
    table says: a field the command line set stays; repeatable keys add the file's values
    after the command line's; a mapping gets the entries the command line did not set."""
    changes: dict[str, Any] = {}
    for key in OPTION_KEYS.values():
        if key.from_file is not FromFile.MERGED or key.slot is not None:
            continue  # the route (slot keys) is _resolve's
        value = loaded.get(key.name)
        if value is None:
            continue
        current = changes.get(key.field, getattr(config, key.field))
        if key.repeatable:
            # As ssh: the command line's first (-D, -R, -i), then the file's; a repeat
            # is one listener, one key.
            combined = tuple(dict.fromkeys([*current, *cast(list[object], value)]))
            if combined != tuple(current):
                changes[key.field] = combined
        elif key.item is not None:
            if key.item not in current:
                changes[key.field] = {**current, key.item: value}
        elif current is None:
            changes[key.field] = value
    return dataclasses.replace(config, **changes) if changes else config

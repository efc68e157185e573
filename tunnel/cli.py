"""The ``pytunnel`` command: options to a :class:`Config`, a renderer, :func:`app.run`,
and errors to exit statuses. The only room that prints or exits."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from . import __version__, app, events
from .config import (
    Config,
    Destination,
    Forward,
    HostKeyPolicy,
    merge_forwards,
    parse_count,
    parse_destination,
    parse_forward,
    parse_host_key_policy,
    parse_interval,
    parse_option,
    parse_port,
    parse_seconds,
    split_paths,
)
from .errors import ConfigError, ExitStatus, TunnelError
from .notify import OnReady, SystemdNotifier
from .ui import JsonRenderer, PlainRenderer, Tee

PROG = "pytunnel"

# -o keys pytunnel understands, with what each one sets. Keys are matched
# case-insensitively, as ssh does.
_OptionSetter = Callable[[dict[str, Any], str], None]


def _set(field: str, parse: Callable[[str], object]) -> _OptionSetter:
    def setter(values: dict[str, Any], value: str) -> None:
        values[field] = parse(value)

    return setter


def _add_forward(values: dict[str, Any], value: str) -> None:
    values.setdefault("forwards", []).append(parse_forward(value))


def _add_identity(values: dict[str, Any], value: str) -> None:
    values.setdefault("identities", []).append(value)


@dataclass(frozen=True, slots=True)
class OptionKey:
    """One ``-o`` key: its ssh_config name, what it sets, its default and meaning (the
    man page and completions are generated from these)."""

    name: str
    setter: _OptionSetter
    default: str
    help: str
    repeatable: bool = False


OPTION_KEYS: dict[str, OptionKey] = {
    key.name.lower(): key
    for key in (
        OptionKey(
            "StrictHostKeyChecking",
            _set("host_key_policy", parse_host_key_policy),
            "yes",
            "yes: refuse unknown and changed host keys; accept-new: record unknown keys, "
            "refuse changed ones; no: accept any key",
        ),
        OptionKey(
            "UserKnownHostsFile",
            _set("known_hosts", split_paths),
            "~/.ssh/known_hosts ~/.ssh/known_hosts2",
            "known_hosts files to check (and to add accepted keys to, the first one)",
        ),
        OptionKey(
            "GlobalKnownHostsFile",
            _set("global_known_hosts", split_paths),
            "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2",
            "system-wide known_hosts files",
        ),
        OptionKey(
            "ConnectTimeout",
            _set("connect_timeout", lambda v: parse_seconds("ConnectTimeout", v)),
            "15",
            "seconds to wait for the SSH connection and login",
        ),
        OptionKey("Port", _set("port", lambda v: parse_port(v, what="Port")), "22", "SSH port"),
        OptionKey("User", _set("user", str), "the local user", "user to log in as"),
        OptionKey(
            "IdentityFile",
            _add_identity,
            "~/.ssh/id_*",
            "private key file to authenticate with",
            repeatable=True,
        ),
        OptionKey(
            "DynamicForward",
            _add_forward,
            "none",
            "[bind_address:]port to serve SOCKS on, as -D",
            repeatable=True,
        ),
        OptionKey(
            "ServerAliveInterval",
            _set("keepalive_interval", lambda v: parse_interval("ServerAliveInterval", v)),
            "15",
            "seconds between keepalive requests when the server is quiet (0: off)",
        ),
        OptionKey(
            "ServerAliveCountMax",
            _set("keepalive_count", lambda v: parse_count("ServerAliveCountMax", v, low=1)),
            "3",
            "unanswered keepalives before the session counts as lost",
        ),
    )
}


def apply_options(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse every ``-o``; like ssh, the first value given for a key wins."""
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for text in pairs:
        key, value = parse_option(text)
        entry = OPTION_KEYS.get(key.lower())
        if entry is None:
            raise ConfigError(
                f"-o {key}: unsupported option",
                hint="supported: " + ", ".join(key.name for key in OPTION_KEYS.values()),
            )
        if entry.name in seen and not entry.repeatable:
            continue
        seen.add(entry.name)
        entry.setter(values, value)
    return values


def build_config(
    destination: str | None,
    *,
    forwards: Sequence[str],
    port: str | None,
    login: str | None,
    identities: Sequence[str],
    config_file: str | None,
    options: Sequence[str],
    demo: bool,
    handshake_timeout: float = 30.0,
    open_timeout: float = 30.0,
    reconnect: bool = True,
    retry_start: bool = False,
    reconnect_wait: float = 10.0,
    max_connections: int = 4096,
    drain: float = 0.0,
) -> Config:
    opts = apply_options(options)
    if demo:
        if destination:
            raise ConfigError("--demo runs its own server: give no destination with it")
        dest = Destination("127.0.0.1")
    elif not destination:
        raise ConfigError("no destination given", hint=f"usage: {PROG} -D [bind:]port [user@]host")
    else:
        dest = parse_destination(destination)
    user = login or dest.user or opts.get("user")
    dest_port = (
        parse_port(port, what="-p port") if port is not None else dest.port or opts.get("port")
    )
    dest = Destination(dest.host, user, dest_port)
    parsed = merge_forwards([parse_forward(f) for f in forwards] + opts.get("forwards", []))
    if not parsed:
        if not demo:
            raise ConfigError(
                "nothing to forward", hint="give -D [bind_address:]port, for example -D 1080"
            )
        parsed = (Forward(None, 0),)
    ssh_config: tuple[str, ...] | None = None
    if config_file is not None:
        ssh_config = () if config_file == "none" else (config_file,)
    return Config(
        destination=dest,
        forwards=parsed,
        identities=tuple(identities) + tuple(opts.get("identities", [])),
        ssh_config=ssh_config,
        host_key_policy=opts.get("host_key_policy", HostKeyPolicy.YES),
        known_hosts=opts.get("known_hosts"),
        global_known_hosts=opts.get("global_known_hosts"),
        connect_timeout=opts.get("connect_timeout", 15.0),
        handshake_timeout=handshake_timeout,
        open_timeout=open_timeout,
        keepalive_interval=opts.get("keepalive_interval"),
        keepalive_count=opts.get("keepalive_count"),
        reconnect=reconnect,
        retry_start=retry_start,
        reconnect_wait=reconnect_wait,
        max_connections=max_connections,
        drain=drain,
        demo=demo,
    )


class _Command(click.Command):
    """Everything after ``--`` is the local command to run, never parsed as options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta["pytunnel.command"] = args[cut + 1 :]
            args = args[:cut]
        return super().parse_args(ctx, args)


def _fail(message: str, status: int, *, json_out: bool) -> NoReturn:
    if json_out:
        JsonRenderer().write({"event": "error", "message": message, "exit_status": status})
    click.echo(f"{PROG}: {message}", err=True)
    sys.exit(status)


def _write_pidfile(path: str) -> None:
    """Atomically, so a reader never sees a half-written number."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as handle:
        handle.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _background() -> Callable[[events.Ready], None]:
    """``-f``: fork now; the parent waits until the child is ready (exit 0) or has
    failed (exit with its status; its error line is already on stderr). Returns what
    the child does once ready: detach from the terminal and tell the parent."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            word = pipe.read(1)
        if word == b"R":
            os._exit(ExitStatus.OK)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
    os.close(read_end)
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def detach(_: events.Ready) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.write(write_end, b"R")
        os.close(write_end)

    return detach


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    tunnel_level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.getLogger("tunnel").setLevel(tunnel_level)
    # asyncssh is chatty at INFO; show it only from -vv, and its packet debug at -vvv.
    logging.getLogger("asyncssh").setLevel(
        logging.ERROR if verbose < 2 else logging.INFO if verbose == 2 else logging.DEBUG
    )
    if verbose >= 3:
        from .session import enable_protocol_debug

        enable_protocol_debug()


@click.command(
    cls=_Command,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Exit status: 0 ok, 2 usage, 3 cannot listen, 255 SSH failed, 130 interrupted; "
    "with -- COMMAND, the command's own status.",
)
@click.argument("destination", required=False, metavar="[user@]host[:port]")
@click.option(
    "-D",
    "forwards",
    multiple=True,
    metavar="[bind_address:]port",
    help="Serve SOCKS4/4a/5 on this port (0 picks a free one); loopback only unless an "
    "address is given ('*' for all). Repeatable.",
)
@click.option("-p", "port", metavar="port", help="SSH port on the server.")
@click.option("-l", "login", metavar="login_name", help="User to log in as.")
@click.option(
    "-i", "identities", multiple=True, metavar="identity_file", help="Private key file. Repeatable."
)
@click.option(
    "-F", "config_file", metavar="configfile", help="ssh_config file to read ('none' for none)."
)
@click.option("-o", "options", multiple=True, metavar="Key=Value", help="ssh_config option.")
@click.option(
    "-N",
    "no_command",
    is_flag=True,
    help="Accepted for ssh compatibility (no remote command is ever run).",
)
@click.option("-T", "no_tty", is_flag=True, help="Accepted for ssh compatibility.")
@click.option("-q", "quiet", is_flag=True, help="Quiet: show problems only.")
@click.option("-v", "verbose", count=True, help="More diagnostics (-vv, -vvv for more).")
@click.option("--json", "json_out", is_flag=True, help="JSON events on stdout, 'ready' first.")
@click.option(
    "--demo",
    is_flag=True,
    help="Tunnel through a throwaway SSH server on loopback to try pytunnel.",
)
@click.option(
    "--handshake-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Close SOCKS clients that send no complete request in time.",
)
@click.option(
    "--open-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Fail a request (reply 0x06) if the channel does not open in time.",
)
@click.option(
    "--no-reconnect",
    "no_reconnect",
    is_flag=True,
    help="Exit (status 255) when the SSH session is lost, as ssh does, instead of reconnecting.",
)
@click.option(
    "--retry-start",
    is_flag=True,
    help="Keep retrying if the first connection fails (for services) instead of exiting.",
)
@click.option(
    "--reconnect-wait",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="While reconnecting, how long a new request waits before it fails (reply 0x01).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    metavar="N",
    help="Clients served at once; more get a failure reply.",
)
@click.option(
    "--drain",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM or Ctrl-C, let open connections finish for this long.",
)
@click.option(
    "-f",
    "background",
    is_flag=True,
    help="Go to the background once every listener is ready and the session is up.",
)
@click.option(
    "--pidfile",
    type=click.Path(dir_okay=False, writable=True),
    metavar="PATH",
    help="Write the tunnel's PID here once it is ready; removed on exit.",
)
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
@click.pass_context
def command(
    ctx: click.Context,
    destination: str | None,
    forwards: tuple[str, ...],
    port: str | None,
    login: str | None,
    identities: tuple[str, ...],
    config_file: str | None,
    options: tuple[str, ...],
    no_command: bool,
    no_tty: bool,
    quiet: bool,
    verbose: int,
    json_out: bool,
    demo: bool,
    handshake_timeout: float,
    open_timeout: float,
    no_reconnect: bool,
    retry_start: bool,
    reconnect_wait: float,
    max_connections: int,
    drain: float,
    background: bool,
    pidfile: str | None,
) -> None:
    """SSH dynamic port forwarding, like ssh -D: a SOCKS4/4a/5 proxy whose every connection
    goes through an SSH direct-tcpip channel.

    \b
      pytunnel -D 1080 user@host        then use socks5h://127.0.0.1:1080
      pytunnel -D 0 --json host -- curl https://intranet/
      pytunnel --demo                   try it with no SSH server of your own
    """
    run_command: list[str] = ctx.meta.get("pytunnel.command", [])
    _setup_logging(verbose)
    try:
        config = build_config(
            destination,
            forwards=forwards,
            port=port,
            login=login,
            identities=identities,
            config_file=config_file,
            options=options,
            demo=demo,
            handshake_timeout=handshake_timeout,
            open_timeout=open_timeout,
            reconnect=not no_reconnect,
            retry_start=retry_start,
            reconnect_wait=reconnect_wait,
            max_connections=max_connections,
            drain=drain,
        )
    except ConfigError as exc:
        _fail(str(exc), ExitStatus.USAGE, json_out=json_out)
    if background and run_command:
        _fail("-f and -- COMMAND do not go together", ExitStatus.USAGE, json_out=json_out)
    sinks: list[events.Sink] = []
    if json_out:
        sinks.append(JsonRenderer())
    sinks.append(PlainRenderer(quiet=quiet))
    notifier = SystemdNotifier.from_environment()
    if notifier is not None:
        sinks.append(notifier)
    if pidfile:
        sinks.append(OnReady(lambda _: _write_pidfile(pidfile)))
    if background:
        sinks.append(OnReady(_background()))
    try:
        status = app.run(config, Tee(*sinks), run_command)
    except TunnelError as exc:
        if verbose:
            logging.getLogger("tunnel").exception("failed")
        _fail(str(exc), exc.exit_status, json_out=json_out)
    except KeyboardInterrupt:
        sys.exit(ExitStatus.INTERRUPTED)
    finally:
        if pidfile:
            with contextlib.suppress(OSError):
                os.unlink(pidfile)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point. Usage errors are one line and exit status 2, like ssh's."""
    try:
        result = command.main(
            args=list(argv) if argv is not None else None, prog_name=PROG, standalone_mode=False
        )
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        sys.exit(ExitStatus.USAGE)
    except click.UsageError as exc:
        hint = f" (see {PROG} -h)" if exc.ctx is not None else ""
        click.echo(f"{PROG}: {exc.format_message()}{hint}", err=True)
        sys.exit(ExitStatus.USAGE)
    except click.Abort:
        sys.exit(ExitStatus.INTERRUPTED)
    except click.ClickException as exc:
        click.echo(f"{PROG}: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(result if isinstance(result, int) else 0)

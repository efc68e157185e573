"""The ``pytunnel`` command: options to a :class:`Config`, a renderer, :func:`app.run`,
and errors to exit statuses. The only room that prints or exits."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

import click

from . import __version__, events
from .config import LOG_LEVELS as LOG_LEVELS  # the docs generator reads these here
from .config import OPTION_KEYS as OPTION_KEYS
from .config import (
    AddressFamily,
    Config,
    Destination,
    Forward,
    apply_options,
    merge_forwards,
    parse_destination,
    parse_dns_server,
    parse_forward,
    parse_jump_hosts,
    parse_port,
    parse_reverse_forward,
)
from .config import OptionKey as OptionKey
from .errors import ConfigError, ExitStatus, TunnelError
from .names import printable
from .notify import OnReady, SystemdNotifier
from .rules import Action, Route, parse_route, parse_routes_file, parse_rules
from .ui import TIMESTAMP_FORMAT, JsonRenderer, PlainRenderer, Tee, TerminalPrompter, error_record

PROG = "pytunnel"


def build_config(
    destination: str | None,
    *,
    forwards: Sequence[str] = (),
    reverse_forwards: Sequence[str] = (),
    port: str | None = None,
    login: str | None = None,
    identities: Sequence[str] = (),
    config_file: str | None = None,
    options: Sequence[str] = (),
    ciphers: str | None = None,
    macs: str | None = None,
    jump: str | None = None,
    family: AddressFamily | None = None,
    compression: bool = False,
    gateway_ports: bool = False,
    demo: bool = False,
    **settings: Any,
) -> Config:
    """The command line as a :class:`Config`. Flags win over ``-o``; for ``-o`` the first
    value of a key wins, as in ssh. ``settings`` are Config fields given as they are."""
    # -c and -m are -o Ciphers= and -o MACs= (checked the same way), ahead of every -o.
    flags = [f"{key}={value}" for key, value in (("Ciphers", ciphers), ("MACs", macs)) if value]
    opts = apply_options([*flags, *options])
    # From the command line (-S or -o ControlPath): a missing master is an error.
    opts["control_path_explicit"] = "control_path" in opts
    if demo:
        if destination:
            raise ConfigError("--demo runs its own server: give no destination with it")
        dest = Destination("127.0.0.1")
    elif not destination:
        raise ConfigError("no destination given", hint=f"usage: {PROG} -D [bind:]port [user@]host")
    else:
        dest = parse_destination(destination)
    dest_port = parse_port(port, what="-p port") if port is not None else None
    # As ssh: -l and -o User beat user@host, -p and -o Port beat host:port.
    dest = Destination(
        opts.get("hostname", dest.host),
        login or opts.get("user") or dest.user,
        dest_port or opts.get("port") or dest.port,
    )
    parsed = merge_forwards([parse_forward(f) for f in forwards] + opts.get("forwards", []))
    reverse = merge_forwards(
        [parse_reverse_forward(f) for f in reverse_forwards] + opts.get("reverse_forwards", [])
    )
    if not parsed and demo:
        parsed = (Forward(None, 0),)
    ssh_config: tuple[str, ...] | None = None
    if config_file is not None:
        ssh_config = () if config_file == "none" else (config_file,)
    derived_keys = ("user", "port", "hostname", "forwards", "reverse_forwards")
    for derived in (*derived_keys, "exit_on_forward_failure"):
        opts.pop(derived, None)
    opts.pop("log_level", None)
    if jump is not None:
        # -J is a flag: it wins over -o ProxyJump and -o ProxyCommand, as in ssh when it
        # comes first.
        opts["jump_hosts"] = parse_jump_hosts(jump)
        opts.pop("proxy_command", None)
    if family is not None:
        opts["address_family"] = family
    if compression:
        opts["compression"] = True
    if gateway_ports:
        opts["gateway_ports"] = True
    opts["identities"] = tuple(identities) + tuple(opts.get("identities", ()))
    return Config(
        destination=dest,
        forwards=parsed,
        reverse_forwards=reverse,
        ssh_config=ssh_config,
        demo=demo,
        **opts,
        **settings,
    )


class _Command(click.Command):
    """Everything after ``--`` is the local command to run, never parsed as options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta["pytunnel.command"] = args[cut + 1 :]
            args = args[:cut]
        ctx.meta["pytunnel.rules"] = _ordered_rules(args)
        ctx.meta["pytunnel.routes"] = _ordered_routes(args)
        return super().parse_args(ctx, args)


def _ordered_rules(args: Sequence[str]) -> list[tuple[Action, str]]:
    """--allow and --deny in the order given: first match wins across both, which two
    separate click options would lose."""
    found: list[tuple[Action, str]] = []
    names = {"--allow": Action.ALLOW, "--deny": Action.DENY}
    for index, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in names:
            if eq:
                found.append((names[name], value))
            elif index + 1 < len(args):
                found.append((names[name], args[index + 1]))
    return found


def _ordered_routes(args: Sequence[str]) -> list[tuple[str, str]]:
    """--route and --routes in the order given, as --allow and --deny: the first route
    that matches wins, whichever of the two options gave it."""
    found: list[tuple[str, str]] = []
    for index, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in ("--route", "--routes"):
            if eq:
                found.append((name, value))
            elif index + 1 < len(args):
                found.append((name, args[index + 1]))
    return found


def read_routes(ordered: Sequence[tuple[str, str]]) -> tuple[Route, ...]:
    """Every route, in order; a bad one (or a file that cannot be read) is a
    :class:`ConfigError` naming where it was given."""
    routes: list[Route] = []
    for option, value in ordered:
        if option == "--route":
            routes.append(parse_route(value, "--route", parse_destination))
            continue
        try:
            with open(value, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"cannot read --routes {value}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"cannot read --routes {value}: not UTF-8 text") from None
        routes.extend(parse_routes_file(text, value, parse_destination))
    return tuple(routes)


PASSWORD_ENV = "PYTUNNEL_PROXY_PASSWORD"


def _master_mode(mode: str | None) -> str:
    from .mux import HANDOVER_SUPPORTED

    if mode is None:
        return "handover" if HANDOVER_SUPPORTED else "stdio"
    if mode == "handover" and not HANDOVER_SUPPORTED:
        raise ConfigError(
            "--master-mode handover needs Linux (TCP_INFO's count of bytes received)",
            hint="use --master-mode stdio",
        )
    return mode


def proxy_credentials(user: str | None, password_file: str | None) -> tuple[bytes, bytes] | None:
    """The listener's credentials: never from the command line, where ps shows them."""
    if user is None:
        if password_file is not None:
            raise ConfigError("--proxy-password-file needs --proxy-auth USER")
        return None
    if not user or len(user.encode()) > 255 or ":" in user:
        raise ConfigError(f"bad --proxy-auth user {user!r}: 1 to 255 bytes, no ':'")
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as handle:
                password = handle.readline().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read {password_file}: {exc.strerror}") from exc
    else:
        password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        raise ConfigError(
            "--proxy-auth needs a password",
            hint=f"set {PASSWORD_ENV} or give --proxy-password-file PATH",
        )
    if len(password.encode()) > 255:
        raise ConfigError("the proxy password is longer than SOCKS5 allows (255 bytes)")
    return user.encode(), password.encode()


def _fail(message: str, status: int, *, json_out: bool) -> NoReturn:
    if json_out:
        JsonRenderer().write(error_record(message, status, time.time()))
    # The message may quote the server (a disconnect reason): show it, not its controls.
    click.echo(f"{PROG}: {printable(message)}", err=True)
    sys.exit(status)


def _check_pidfile(path: str, *, json_out: bool) -> None:
    """Find out now, not once the tunnel is up, that the pidfile cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.access(directory, os.W_OK | os.X_OK):
        _fail(
            f"cannot write --pidfile {path}: {directory} is not a writable directory",
            ExitStatus.USAGE,
            json_out=json_out,
        )


def _write_pidfile(path: str) -> None:
    """Atomically, so a reader never sees a half-written number."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as handle:
            handle.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        logging.getLogger("tunnel").warning("cannot write pidfile %s: %s", path, exc.strerror)


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
        # Let go of the terminal; an -E log file has its own descriptor and stays.
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.write(write_end, b"R")
        os.close(write_end)

    return detach


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time, so that log lines go through the
    live view (which swaps stderr to print above itself) instead of across it."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class _SafeFormatter(logging.Formatter):
    """Log lines quote names and messages from the network: one line each, with their
    control characters escaped (a "\\n" in a name must not forge a line of its own)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return printable(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:
        return printable(super().formatStack(stack_info), keep="\n")


class _VerboseFormatter(_SafeFormatter):
    """-v: log lines in the event lines' own format (local time, then the text), so the
    two read as one stream; a warning says so, asyncssh's lines say whose they are."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", datefmt=TIMESTAMP_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        prefix = "asyncssh: " if record.name.startswith("asyncssh") else ""
        if record.levelno >= logging.WARNING:
            prefix = f"{record.levelname.lower()}: {prefix}"
        return super().formatMessage(record).replace(" ", f" {prefix}", 1)


def _setup_logging(verbose: int, stream: TextIO) -> None:
    handler = _CurrentStderr() if stream is sys.stderr else logging.StreamHandler(stream)
    # Plain "pytunnel: message" as ssh words its warnings; with -v, the event lines' form.
    handler.setFormatter(_VerboseFormatter() if verbose else _SafeFormatter(f"{PROG}: %(message)s"))
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


def _seconds(default: float, *, positive: bool = True) -> dict[str, Any]:
    return {
        "type": click.FloatRange(min=0, min_open=positive),
        "default": default,
        "show_default": True,
        "metavar": "SECONDS",
    }


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
@click.option(
    "-R",
    "reverse_forwards",
    multiple=True,
    metavar="[bind_address:]port",
    help="Reverse: the server serves SOCKS on this port (its loopback unless an address is "
    "given; 0 lets it pick) and connects through here to this machine's network. "
    "Repeatable.",
)
@click.option("-p", "port", metavar="port", help="SSH port on the server.")
@click.option("-l", "login", metavar="login_name", help="User to log in as.")
@click.option(
    "-i", "identities", multiple=True, metavar="identity_file", help="Private key file. Repeatable."
)
@click.option(
    "-J", "jump", metavar="[user@]host[:port][,...]", help="Connect through these jump hosts."
)
@click.option(
    "-F", "config_file", metavar="configfile", help="ssh_config file to read ('none' for none)."
)
@click.option("-o", "options", multiple=True, metavar="Key=Value", help="ssh_config option.")
@click.option(
    "-S",
    "control_socket",
    metavar="ctl_path",
    help="Ride the OpenSSH master connection listening on this control socket instead of "
    "logging in, as -o ControlPath=.",
)
@click.option("-4", "ipv4", is_flag=True, help="Connect to the SSH server over IPv4 only.")
@click.option("-6", "ipv6", is_flag=True, help="Connect to the SSH server over IPv6 only.")
@click.option("-C", "compression", is_flag=True, help="Compress the SSH connection.")
@click.option("-c", "cipher_spec", metavar="cipher_spec", help="Ciphers to offer, as -o Ciphers=.")
@click.option("-m", "mac_spec", metavar="mac_spec", help="MACs to offer, as -o MACs=.")
@click.option(
    "-g", "gateway_ports", is_flag=True, help="-D without an address listens on every interface."
)
@click.option(
    "-N", "no_command", is_flag=True, help="Accepted for ssh compatibility (no remote command)."
)
@click.option("-T", "no_tty", is_flag=True, help="Accepted for ssh compatibility.")
@click.option(
    "-f",
    "background",
    is_flag=True,
    help="Go to the background once every listener is ready and the session is up.",
)
@click.option("-q", "quiet", is_flag=True, help="Quiet: show problems only.")
@click.option("-v", "verbose", count=True, help="More diagnostics (-vv, -vvv for more).")
@click.option(
    "-E",
    "log_file",
    type=click.Path(dir_okay=False, writable=True),
    metavar="log_file",
    help="Append status lines and diagnostics to this file instead of stderr.",
)
@click.option("--json", "json_out", is_flag=True, help="JSON events on stdout, 'ready' first.")
@click.option(
    "--demo", is_flag=True, help="Try pytunnel through a throwaway SSH server on loopback."
)
@click.option(
    "--pidfile",
    type=click.Path(dir_okay=False, writable=True),
    metavar="PATH",
    help="Write the tunnel's PID here once it is ready; removed on exit.",
)
@click.option(
    "--handshake-timeout",
    **_seconds(30.0),
    help="Close SOCKS clients that send no complete request in time.",
)
@click.option(
    "--open-timeout",
    **_seconds(30.0),
    help="Fail a request (reply 0x06) if the channel does not open in time.",
)
@click.option(
    "--no-reconnect",
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
    **_seconds(10.0, positive=False),
    help="While reconnecting, how long a new request waits before it fails (reply 0x01).",
)
@click.option(
    "--give-up-after",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Exit (status 255) when the SSH session has been down this long, for a service "
    "manager to restart pytunnel.",
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
    "--connections",
    type=click.IntRange(min=1, max=64),
    default=1,
    show_default=True,
    metavar="N",
    help="Spread channels over up to N SSH connections (opened as they are needed).",
)
@click.option(
    "--master-mode",
    type=click.Choice(["handover", "stdio", "proxy"]),
    metavar="MODE",
    help="Through an OpenSSH master (-S): handover (the default on Linux) has the master "
    "read each client itself and pytunnel pass the server's bytes on; stdio (the default "
    "elsewhere) has pytunnel relay both ways; in both a refused connection is reply 0x01. "
    "proxy has pytunnel frame the SSH packets (slower; the server's own reason, such as "
    "0x05 refused).",
)
@click.option(
    "--drain",
    **_seconds(0.0, positive=False),
    help="On SIGTERM or Ctrl-C, let open connections finish for this long.",
)
@click.option(
    "--proxy-auth",
    metavar="USER",
    help=f"Require this user and a password (from ${PASSWORD_ENV} or "
    "--proxy-password-file) from clients: SOCKS5 username/password, HTTP Basic.",
)
@click.option(
    "--proxy-password-file",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="File whose first line is the --proxy-auth password.",
)
@click.option(
    "--allow",
    "allow_rules",
    multiple=True,
    metavar="RULE",
    help="Allow destinations: host glob, CIDR or address, optionally :port or :low-high. "
    "Repeatable; with --deny, the first match wins.",
)
@click.option(
    "--deny",
    "deny_rules",
    multiple=True,
    metavar="RULE",
    help="Refuse destinations (reply 0x02 / HTTP 403) before they reach the server. "
    "--deny '*' last makes an allowlist.",
)
@click.option(
    "--route",
    "route_specs",
    multiple=True,
    metavar="RULE=TARGET",
    help="Send what RULE matches (as --allow) to TARGET: direct, reject, or SSH "
    "destinations separated by commas, the next used while one is down. Repeatable; the "
    "first match wins; the rest goes to the destination.",
)
@click.option(
    "--routes",
    "routes_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Read routes from FILE, one RULE=TARGET a line ('#' comments).",
)
@click.option(
    "--udp-helper",
    is_flag=True,
    help="SOCKS5 UDP beyond DNS: run a small relay on the server over an exec channel "
    "(nothing is installed there). Without it only DNS (port 53) is relayed, as DNS "
    "over TCP.",
)
@click.option(
    "--dns-server",
    metavar="HOST[:PORT]",
    help="Send every UDP DNS query (SOCKS5 UDP to port 53) to this resolver, as DNS over "
    "TCP from the server, instead of where each query was addressed.",
)
@click.option(
    "--allow-open-proxy",
    is_flag=True,
    help="Listen on a non-loopback address without --proxy-auth, serving anyone who can reach it.",
)
@click.option(
    "--isolate",
    is_flag=True,
    help="Never let proxy users with different names (SOCKS5 username, HTTP Basic) share "
    "an SSH connection: each name gets its own. Without --proxy-auth any name and "
    "password are accepted, as isolation keys only.",
)
@click.option(
    "--isolate-idle",
    **_seconds(300.0),
    help="Close the SSH connection of an isolated user name after this long without a connection.",
)
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
@click.pass_context
def command(ctx: click.Context, /, **params: Any) -> None:
    """SSH dynamic port forwarding, like ssh -D: a SOCKS4/4a/5 proxy whose every connection
    goes through an SSH direct-tcpip channel.

    \b
      pytunnel -D 1080 user@host        then use socks5h://127.0.0.1:1080
      pytunnel -D 0 host -- curl https://intranet/
      pytunnel --demo                   try it with no SSH server of your own
    """
    run_command: list[str] = ctx.meta.get("pytunnel.command", [])
    json_out: bool = params["json_out"]
    if params["ipv4"] and params["ipv6"]:
        _fail("-4 and -6 do not go together", ExitStatus.USAGE, json_out=json_out)
    if params["background"] and run_command:
        _fail("-f and -- COMMAND do not go together", ExitStatus.USAGE, json_out=json_out)
    if params["background"] and not hasattr(os, "fork"):
        _fail("-f needs fork(), which this system lacks", ExitStatus.USAGE, json_out=json_out)
    try:
        log_level = apply_options(params["options"]).get("log_level")
        config = build_config(
            params["destination"],
            forwards=params["forwards"],
            reverse_forwards=params["reverse_forwards"],
            port=params["port"],
            login=params["login"],
            identities=params["identities"],
            config_file=params["config_file"],
            # -S is a flag: it wins over -o ControlPath, as -c over -o Ciphers.
            options=[
                *((f"ControlPath={params['control_socket']}",) if params["control_socket"] else ()),
                *params["options"],
            ],
            ciphers=params["cipher_spec"],
            macs=params["mac_spec"],
            jump=params["jump"],
            family=(
                AddressFamily.INET
                if params["ipv4"]
                else AddressFamily.INET6
                if params["ipv6"]
                else None
            ),
            compression=params["compression"],
            gateway_ports=params["gateway_ports"],
            demo=params["demo"],
            handshake_timeout=params["handshake_timeout"],
            open_timeout=params["open_timeout"],
            reconnect=not params["no_reconnect"],
            retry_start=params["retry_start"],
            reconnect_wait=params["reconnect_wait"],
            give_up_after=params["give_up_after"],
            max_connections=params["max_connections"],
            drain=params["drain"],
            master_mode=_master_mode(params["master_mode"]),
            ssh_connections=params["connections"],
            rules=parse_rules(ctx.meta.get("pytunnel.rules", [])),
            routes=read_routes(ctx.meta.get("pytunnel.routes", [])),
            proxy_credentials=proxy_credentials(
                params["proxy_auth"], params["proxy_password_file"]
            ),
            allow_open_proxy=params["allow_open_proxy"],
            isolate=params["isolate"],
            isolate_idle=params["isolate_idle"],
            udp_helper=params["udp_helper"],
            dns_server=parse_dns_server(params["dns_server"]) if params["dns_server"] else None,
        )
    except ConfigError as exc:
        _fail(str(exc), ExitStatus.USAGE, json_out=json_out)
    verbose: int = params["verbose"] if log_level is None else max(params["verbose"], log_level)
    quiet: bool = params["quiet"] or log_level == -1
    log_stream = _open_log(params["log_file"], json_out=json_out)
    _setup_logging(verbose, log_stream)
    prompter = TerminalPrompter.open()
    sinks: list[events.Sink] = []
    if json_out:
        sinks.append(JsonRenderer())
    # The live view needs the terminal to itself: not with -- COMMAND (its output would
    # run through the view), -f, -q or -E.
    view = None
    live = (
        log_stream.isatty()
        and not (run_command or params["background"] or quiet or params["log_file"])
        and os.environ.get("TERM") != "dumb"
    )
    if live:
        from rich.console import Console

        from .live import LiveRenderer

        # Monotonic, like the start times the proxy records for each connection. "q" is
        # a normal quit, as SIGTERM is (exit 0, --drain applies); Ctrl-C stays 130.
        view = LiveRenderer(
            Console(stderr=True),
            str(config.destination),
            clock=time.monotonic,
            on_quit=lambda: signal.raise_signal(signal.SIGTERM),
            keys=_terminal_input(),
        )
        sinks.append(view)
        if prompter is not None:
            prompter.before_prompt, prompter.after_prompt = view.pause, view.resume
    else:
        sinks.append(PlainRenderer(log_stream, quiet=quiet))
    notifier = SystemdNotifier.from_environment()
    if notifier is not None:
        sinks.append(notifier)
    pidfile: str | None = params["pidfile"]
    if pidfile:
        _check_pidfile(pidfile, json_out=json_out)

    def remove_pidfile() -> None:
        if pidfile:
            with contextlib.suppress(OSError):
                os.unlink(pidfile)

    def force_exit() -> None:
        # A second Ctrl-C: the person wants out now, without the drain or the close;
        # give the terminal back first.
        if view is not None:
            view.stop(summary=False)
        remove_pidfile()
        os._exit(ExitStatus.INTERRUPTED)

    if pidfile:
        sinks.append(OnReady(lambda _: _write_pidfile(pidfile)))
    if params["background"]:
        sinks.append(OnReady(_background()))
    emit = Tee(*sinks)
    try:
        # Imported here, not at the top: the SSH side (asyncssh and the crypto it loads)
        # is most of pytunnel's start-up time, and -V, -h and usage errors never need it.
        from . import app

        status = app.run(config, emit, run_command, prompter, force_exit)
    except TunnelError as exc:
        if view is not None:
            view.stop(summary=False)  # the error line goes below a restored terminal
        if verbose:
            logging.getLogger("tunnel").exception("failed")
        _fail(str(exc), exc.exit_status, json_out=json_out)
    except KeyboardInterrupt:
        sys.exit(ExitStatus.INTERRUPTED)
    finally:
        if view is not None:
            # Whatever ended the run (a bug, an interrupt during start-up), the terminal
            # gets its echo back; after a normal stop this does nothing.
            view.stop(summary=False)
        emit.flush()
        remove_pidfile()
    sys.exit(status)


def _terminal_input() -> int | None:
    """The descriptor the live view reads keys from: stdin when it is a terminal."""
    try:
        return sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    except (OSError, ValueError):
        return None


def _open_log(path: str | None, *, json_out: bool) -> TextIO:
    if path is None:
        return sys.stderr
    try:
        # A new log is the owner's alone (it names hosts, users and clients); an existing
        # one is appended to, as ssh -E does, and keeps the mode its owner gave it.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        _fail(f"cannot open log file {path}: {exc.strerror}", ExitStatus.USAGE, json_out=json_out)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


def _usage_hint(exc: click.UsageError) -> str:
    """What an ssh user most likely meant."""
    message = exc.format_message()
    if "unexpected extra argument" in message:
        return " (pytunnel runs no remote command: put a local command after --)"
    if any(f"'-{flag}'" in message for flag in "LRW"):
        return " (pytunnel does dynamic forwarding only: -D [bind_address:]port)"
    return f" (see {PROG} -h)" if exc.ctx is not None else ""


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
        click.echo(f"{PROG}: {exc.format_message()}{_usage_hint(exc)}", err=True)
        sys.exit(ExitStatus.USAGE)
    except click.Abort:
        sys.exit(ExitStatus.INTERRUPTED)
    except click.ClickException as exc:
        click.echo(f"{PROG}: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(result if isinstance(result, int) else 0)

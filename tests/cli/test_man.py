"""man/pytunnel.1 against the CLI: every option and ``-o`` key, nothing the CLI lacks,
the sections the issue asks for, clean under groff's warnings, and rendered by man(1).
Whether it matches the generator byte for byte is test_completions' drift test."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tunnel import cli
from tunnel.errors import ExitStatus

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man" / "pytunnel.1"
SECTIONS = (
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "ENVIRONMENT",
    "FILES",
    "EXIT STATUS",
    "EXAMPLES",
    "SECURITY",
    "SEE ALSO",
)
OPTION_TOKEN = re.compile(r"(?<![\w/=.-])(--?[A-Za-z0-9][\w-]*)")


def plain(roff: str) -> str:
    """Roff text as it reads: font changes dropped, escapes turned back into characters."""
    text = re.sub(r"\\f[BIRP]", "", roff)
    for escape, char in (
        ("\\-", "-"),
        ("\\(ti", "~"),
        ("\\(ha", "^"),
        ("\\(aq", "'"),
        ("\\(ga", "`"),
        ("\\&", ""),
        ("\\ ", " "),
        ("\\e", "\\"),
    ):
        text = text.replace(escape, char)
    return text


def sections() -> dict[str, list[str]]:
    """Each .SH section's lines, in order."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in MAN.read_text().splitlines():
        if line.startswith(".SH "):
            current = found.setdefault(line[4:].strip().strip('"'), [])
        else:
            current.append(line)
    return found


def tags(lines: list[str]) -> list[str]:
    """The tag line after each .TP."""
    return [plain(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line.startswith(".TP")]


def entries(lines: list[str]) -> dict[str, str]:
    """Each .TP tag and the text under it, up to the next request, as one line."""
    found: dict[str, str] = {}
    for i, line in enumerate(lines[:-1]):
        if line.startswith(".TP"):
            body = []
            for text in lines[i + 2 :]:
                if text.startswith("."):
                    break
                body.append(text)
            found[plain(lines[i + 1])] = plain(" ".join(body))
    return found


def cli_params() -> list[click.Parameter]:
    ctx = click.Context(cli.command, info_name=cli.PROG, **cli.command.context_settings)
    return cli.command.get_params(ctx)


def cli_options() -> dict[str, click.Option]:
    return {
        name: param
        for param in cli_params()
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
    }


def is_cli_option(token: str) -> bool:
    """A real option, or a count option repeated (-vvv)."""
    options = cli_options()
    if token in options:
        return True
    flag = token[:2]
    return flag in options and options[flag].count and token[1:] == token[1] * (len(token) - 1)


def is_flag_cluster(token: str) -> bool:
    """Single-letter flags written together, as the synopsis groups them (-46Cf)."""
    options = cli_options()
    return not token.startswith("--") and all(
        f"-{char}" in options and (options[f"-{char}"].is_flag or options[f"-{char}"].count)
        for char in token[1:]
    )


def test_sections_in_order() -> None:
    assert list(sections()) == list(SECTIONS)


def test_every_cli_option_is_an_options_entry() -> None:
    entries = {token for tag in tags(sections()["OPTIONS"]) for token in OPTION_TOKEN.findall(tag)}
    assert set(cli_options()) <= entries
    text = plain(MAN.read_text())
    for name in cli_options():
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name


def test_every_option_in_help_is_in_the_man_page() -> None:
    result = CliRunner().invoke(cli.command, ["--help"], prog_name=cli.PROG)
    assert result.exit_code == 0, result.output
    _, _, options = result.output.partition("Options:")
    in_help = {
        token
        for line in options.splitlines()
        if line.startswith("  -")
        for token in OPTION_TOKEN.findall(line.split("  ")[1])
    }
    assert "-D" in in_help
    assert "--help" in in_help
    entries = {token for tag in tags(sections()["OPTIONS"]) for token in OPTION_TOKEN.findall(tag)}
    assert in_help <= entries, in_help - entries


def test_options_section_names_no_option_the_cli_lacks() -> None:
    text = plain("\n".join(sections()["OPTIONS"]))
    unknown = {token for token in OPTION_TOKEN.findall(text) if not is_cli_option(token)}
    assert not unknown
    synopsis = plain("\n".join(sections()["SYNOPSIS"]))
    unknown = {
        token
        for token in OPTION_TOKEN.findall(synopsis)
        if not is_cli_option(token) and not is_flag_cluster(token)
    }
    assert not unknown


def test_synopsis_flag_group_is_every_single_letter_flag() -> None:
    synopsis = plain("\n".join(sections()["SYNOPSIS"]))
    group = re.search(r"\[-([0-9A-Za-z]{2,})\]", synopsis)
    assert group is not None
    flags = {
        name[1]
        for name, option in cli_options().items()
        if len(name) == 2 and (option.is_flag or option.count)
    }
    assert sorted(group.group(1)) == sorted(flags)


def test_every_option_key_with_its_default() -> None:
    found = entries(sections()["OPTIONS"])
    for key in cli.OPTION_KEYS.values():
        assert key.name in found, key.name
        assert found[key.name].endswith(f"Default: {key.default}."), key.name


def test_defaults_of_options_shown() -> None:
    found = entries(sections()["OPTIONS"])
    for param in cli_params():
        if not isinstance(param, click.Option) or not param.show_default:
            continue
        default = param.default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        (body,) = (text for tag, text in found.items() if tag.split()[0] == param.opts[0])
        assert body.endswith(f"Default: {shown}."), param.opts[0]


def test_environment_files_and_exit_status() -> None:
    found = sections()
    environment = " ".join(tags(found["ENVIRONMENT"]))
    for name in ("NOTIFY_SOCKET", "SSH_AUTH_SOCK", "ALL_PROXY", "all_proxy", "PYTUNNEL_PORT"):
        assert name in environment
    files = tags(found["FILES"])
    for path in ("~/.ssh/config", "~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts", "~/.ssh/id_*"):
        assert path in files
    statuses = tags(found["EXIT STATUS"])
    for status in (
        ExitStatus.OK,
        ExitStatus.USAGE,
        ExitStatus.LISTEN,
        ExitStatus.SSH,
        ExitStatus.INTERRUPTED,
    ):
        assert str(int(status)) in statuses
    assert "--" in plain("\n".join(found["EXIT STATUS"]))


def test_examples() -> None:
    text = plain("\n".join(sections()["EXAMPLES"]))
    for needle in (
        "socks5h://127.0.0.1:1080",
        "curl --proxy socks5h://",
        "DynamicForward",
        " -- ",
        "Type=notify",
        "ExecStart=/usr/local/bin/pytunnel -D 1080 -o ServerAliveInterval=15 tunnel@bastion",
        "Restart=on-failure",
    ):
        assert needle in text, needle


def example_command_lines() -> list[list[str]]:
    lines = plain("\n".join(sections()["EXAMPLES"])).splitlines()
    found = []
    for line in lines:
        command = line.removeprefix("ExecStart=")
        if Path(command.split(" ", 1)[0]).name == cli.PROG:
            found.append(shlex.split(command)[1:])
    return found


def test_example_command_lines_parse() -> None:
    """Every pytunnel line in EXAMPLES is one the CLI accepts, -o keys included."""
    commands = example_command_lines()
    assert len(commands) >= 4
    for args in commands:
        ctx = cli.command.make_context(cli.PROG, list(args))
        options = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-o"]
        cli.apply_options(options)
        assert ctx.params


def test_see_also() -> None:
    text = plain("\n".join(sections()["SEE ALSO"]))
    assert "ssh(1)" in text
    assert "ssh_config(5)" in text


def test_groff_reports_no_warnings() -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    run = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(MAN)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0
    assert run.stderr == ""


def test_mandoc_lint() -> None:
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed")
    run = subprocess.run(
        ["mandoc", "-T", "lint", "-W", "warning", str(MAN)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.stdout + run.stderr == ""


def test_man_renders() -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    env = {**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80", "COLUMNS": "80"}
    run = subprocess.run(
        ["man", "-l", str(MAN)], capture_output=True, text=True, env=env, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "EXIT STATUS" in run.stdout
    assert "pytunnel" in run.stdout

"""The shell completions in ``completions/``: generated from the CLI (a drift test), and
run for real in bash, zsh and fish against a throwaway ``$HOME``.

Each shell's tests are skipped only when that shell is not installed (CI installs them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import select
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import click
import pytest

from tunnel import cli
from tunnel.config import HostKeyPolicy

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "completions" / "generate.py"
BASH_SCRIPT = ROOT / "completions" / "pytunnel.bash"
ZSH_SCRIPT = ROOT / "completions" / "_pytunnel"
FISH_SCRIPT = ROOT / "completions" / "pytunnel.fish"
GENERATED = (
    "completions/pytunnel.bash",
    "completions/_pytunnel",
    "completions/pytunnel.fish",
    "man/pytunnel.1",
)

pytestmark = pytest.mark.timeout(120)

# The test ssh_config and known_hosts, and the host names completion must offer from
# them: plain names only, no patterns, negations or hashed entries.
SSH_CONFIG = """\
Host alpha beta
    HostName 192.0.2.10
    User alice
Host *.wild !neg-* gamma
Host = eq-host
  HOST   upper-case # a comment
Hostname not-a-host
Match host delta
    Port 2222
Host "quoted"
"""
KNOWN_HOSTS = """\
# a comment
delta.example,192.0.2.20 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA
|1|c2FsdA==|aGFzaA== ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB
[epsilon]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC
@cert-authority *.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAID
@revoked zeta ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE

alpha ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAB
"""
HOSTS = {
    "alpha", "beta", "gamma", "eq-host", "upper-case", "quoted",
    "delta.example", "192.0.2.20", "epsilon", "zeta",
}  # fmt: skip


def cli_option_names() -> set[str]:
    """Every option name the CLI has, short and long, -h and -V included."""
    ctx = click.Context(cli.command, info_name=cli.PROG, **cli.command.context_settings)
    return {
        name
        for param in cli.command.get_params(ctx)
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
    }


def key_names() -> list[str]:
    return [key.name for key in cli.OPTION_KEYS.values()]


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pytunnel_completions_generate", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A $HOME whose ~/.ssh holds the test ssh_config and known_hosts."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(SSH_CONFIG)
    (home / ".ssh" / "known_hosts").write_text(KNOWN_HOSTS)
    return home


def shell_env(home: Path) -> dict[str, str]:
    return {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}


def need(shell: str) -> str:
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} is not installed")
    return path


# -- generated, not written ----------------------------------------------------------


def test_committed_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(GENERATOR), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    stale = [
        name for name in GENERATED if (tmp_path / name).read_bytes() != (ROOT / name).read_bytes()
    ]
    assert not stale, f"{stale} differ from the CLI: run python completions/generate.py"


def test_check_mode_reports_drift_with_a_diff(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for name in GENERATED:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    with (tmp_path / "completions" / "pytunnel.fish").open("a") as handle:
        handle.write("# edited by hand\n")
    drift = subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drift.returncode == 1
    assert "-# edited by hand" in drift.stdout
    assert "completions/pytunnel.fish" in drift.stdout
    # --check changes nothing.
    assert (tmp_path / "completions" / "pytunnel.fish").read_text().endswith("by hand\n")


def test_generator_model_is_the_cli() -> None:
    model = load_generator().build_model()
    assert set(model.names) == cli_option_names()
    assert [key.name for key in model.keys] == key_names()
    policy = next(key for key in model.keys if key.name == "StrictHostKeyChecking")
    assert set(policy.values) == {p.value for p in HostKeyPolicy}


@pytest.mark.parametrize("script", [BASH_SCRIPT, ZSH_SCRIPT, FISH_SCRIPT], ids=lambda p: p.name)
def test_every_option_and_key_is_in_each_script(script: Path) -> None:
    text = script.read_text()
    for name in cli_option_names():
        if script is FISH_SCRIPT:
            flag = f"-l {name[2:]}" if name.startswith("--") else f"-s {name[1:]}"
            assert re.search(rf"^complete -c pytunnel .*{re.escape(flag)}\b", text, re.M), name
        else:
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name
    for key in key_names():
        assert key in text


@pytest.mark.parametrize("script", [BASH_SCRIPT, ZSH_SCRIPT, FISH_SCRIPT], ids=lambda p: p.name)
def test_no_python_runs_per_tab(script: Path) -> None:
    text = "\n".join(
        line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    assert "python" not in text.lower()
    assert "_PYTUNNEL_COMPLETE" not in text
    assert not re.search(r"^\s*(command\s+)?pytunnel\s", text, re.M)


# -- bash ------------------------------------------------------------------------------

# What bash splits words at by default (COMP_WORDBREAKS, less the blanks).
BREAKS = "\"'@><=;|&(:"


def readline_words(line: str) -> list[str]:
    """COMP_WORDS as readline makes them: blank-separated, and every run of
    COMP_WORDBREAKS characters a word of its own ("-o", "Key", "=", "val")."""
    words: list[str] = []
    pieces = re.compile(f"[{re.escape(BREAKS)}]+|[^{re.escape(BREAKS)}]+")
    for token in line.split():
        words += pieces.findall(token)
    if not line or line[-1].isspace():
        words.append("")
    return words


BASH_DRIVER = r"""
[[ -n $PRELOAD ]] && source "$PRELOAD"
source "$SCRIPT"
if [[ -n $WHOLE ]]; then
    unset COMP_LINE COMP_POINT
else
    COMP_LINE=$1 COMP_POINT=${#1}
fi
shift
COMP_WORDS=("$@")
COMP_CWORD=$(($# - 1))
_pytunnel
((${#COMPREPLY[@]} == 0)) || printf '%s\n' "${COMPREPLY[@]}"
"""


def bash_complete(
    line: str,
    home: Path,
    *,
    whole_words: bool = False,
    bash_completion: bool = False,
    cwd: Path | None = None,
) -> list[str]:
    """Run _pytunnel in a real bash for ``line`` with the cursor at its end; the
    candidates it leaves in COMPREPLY. ``whole_words``: COMP_WORDS split at blanks only,
    with no COMP_LINE, as when something other than readline calls the function."""
    need("bash")
    words = (
        line.split() + ([""] if line.endswith(" ") else [])
        if whole_words
        else (readline_words(line))
    )
    env = {**shell_env(home), "SCRIPT": str(BASH_SCRIPT)}
    if whole_words:
        env["WHOLE"] = "1"
    if bash_completion:
        env["PRELOAD"] = "/usr/share/bash-completion/bash_completion"
    run = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", BASH_DRIVER, "bash", line, *words],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    # Outside readline, compopt complains; our script silences its own calls.
    noise = "compopt: not currently executing completion function"
    assert [line for line in run.stderr.splitlines() if noise not in line] == []
    return run.stdout.splitlines()


def test_bash_script_parses() -> None:
    need("bash")
    run = subprocess.run(["bash", "-n", str(BASH_SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_bash_dash_offers_every_option(home: Path) -> None:
    assert sorted(bash_complete("pytunnel -", home)) == sorted(cli_option_names())
    longs = {name for name in cli_option_names() if name.startswith("--")}
    assert set(bash_complete("pytunnel --", home)) == longs


def test_bash_option_keys(home: Path) -> None:
    expected = {f"{key}=" for key in key_names() if key.lower().startswith("serv")}
    assert expected  # ServerAliveInterval=, ServerAliveCountMax=
    assert set(bash_complete("pytunnel -o Serv", home)) == expected
    # Keys match in any case, as ssh reads them, and attached to -o as well.
    assert set(bash_complete("pytunnel -o serv", home)) == expected
    assert set(bash_complete("pytunnel -D 1080 -oServ", home)) == {f"-o{k}" for k in expected}


def test_bash_option_values(home: Path) -> None:
    expected = {p.value for p in HostKeyPolicy if p.value.startswith("a")}
    assert expected == {"ask", "accept-new"}
    # Readline keeps "StrictHostKeyChecking=" and replaces only the value.
    assert set(bash_complete("pytunnel -o StrictHostKeyChecking=a", home)) == expected
    assert set(bash_complete("pytunnel -oStrictHostKeyChecking=a", home)) == expected
    whole = bash_complete("pytunnel -o StrictHostKeyChecking=a", home, whole_words=True)
    assert set(whole) == {f"StrictHostKeyChecking={v}" for v in expected}
    assert bash_complete("pytunnel -o ProxyJump=bastion,gam", home) == ["bastion,gamma"]


def test_bash_hosts_from_ssh_config_and_known_hosts(home: Path) -> None:
    assert set(bash_complete("pytunnel ", home)) == HOSTS
    assert set(bash_complete("pytunnel -D 1080 -q ", home)) == HOSTS
    assert bash_complete("pytunnel -D 1080 gam", home) == ["gamma"]
    assert bash_complete("pytunnel -fD 1080 eps", home) == ["epsilon"]
    # user@: readline replaces from the "@" on.
    assert bash_complete("pytunnel -D 1080 bob@al", home) == ["@alpha"]
    assert bash_complete("pytunnel -D 1080 bob@al", home, whole_words=True) == ["bob@alpha"]


def test_bash_hosts_follow_dash_f(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_config"
    other.write_text("Host only-here\n")
    from_known_hosts = {"delta.example", "192.0.2.20", "epsilon", "zeta", "alpha"}
    assert set(bash_complete(f"pytunnel -F {other} ", home)) == {"only-here"} | from_known_hosts
    assert set(bash_complete("pytunnel -F none ", home)) == from_known_hosts


def test_bash_jump_hosts(home: Path) -> None:
    if "-J" not in cli_option_names():
        pytest.skip("pytunnel has no -J")
    assert bash_complete("pytunnel -J gam", home) == ["gamma"]
    assert bash_complete("pytunnel -J alpha,bob@ep", home) == ["@epsilon"]
    assert bash_complete("pytunnel -J alpha,bob@ep", home, whole_words=True) == [
        "alpha,bob@epsilon"
    ]


@pytest.mark.parametrize("option", ["-i", "-F", "-E", "--pidfile"])
def test_bash_files(option: str, home: Path, tmp_path: Path) -> None:
    if option not in cli_option_names():
        pytest.skip(f"pytunnel has no {option}")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("id_one", "id_two", "other"):
        (keys / name).write_text("")
    expected = {str(keys / "id_one"), str(keys / "id_two")}
    assert set(bash_complete(f"pytunnel {option} {keys}/id_", home)) == expected
    if option.startswith("--"):
        assert set(bash_complete(f"pytunnel {option}={keys}/id_", home)) == expected
    else:
        assert set(bash_complete(f"pytunnel {option}{keys}/id_", home)) == {
            f"{option}{path}" for path in expected
        }


def test_bash_identity_file_key_completes_files(home: Path, tmp_path: Path) -> None:
    (tmp_path / "id_work").write_text("")
    assert bash_complete(f"pytunnel -o IdentityFile={tmp_path}/id_w", home) == [
        f"{tmp_path}/id_work"
    ]


def test_bash_nothing_where_nothing_fits(home: Path) -> None:
    assert bash_complete("pytunnel -p ", home) == []
    assert bash_complete("pytunnel -D ", home) == []
    # One destination only.
    assert bash_complete("pytunnel -D 1080 alpha ", home) == []


def test_bash_command_after_dashdash(home: Path) -> None:
    found = bash_complete("pytunnel -D 0 alpha -- bas", home)
    assert "bash" in found
    assert "alpha" not in bash_complete("pytunnel -D 0 alpha -- curl ", home)


def test_bash_with_bash_completion_loaded(home: Path) -> None:
    if not Path("/usr/share/bash-completion/bash_completion").is_file():
        pytest.skip("bash-completion is not installed")
    assert set(
        bash_complete("pytunnel -o StrictHostKeyChecking=a", home, bash_completion=True)
    ) == {"ask", "accept-new"}
    assert set(bash_complete("pytunnel ", home, bash_completion=True)) == HOSTS
    assert "bash" in bash_complete("pytunnel -D 0 alpha -- bas", home, bash_completion=True)


class Pty:
    """An interactive shell on a pseudo-terminal, stopped by PID."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.pid, self.fd = os.forkpty()
        if self.pid == 0:  # the child
            os.execvpe(argv[0], list(argv), env)
        self.output = b""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def read_until(self, marker: bytes, timeout: float = 15.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {marker!r} in {self.output[-400:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.output += os.read(self.fd, 4096)
                except OSError:
                    break
        return self.output

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def interactive_bash(home: Path, tmp_path: Path) -> Iterator[tuple[Pty, Path]]:
    need("bash")
    out = tmp_path / "line"
    shell = Pty(["bash", "--norc", "--noprofile", "-i"], {**shell_env(home), "TERM": "dumb"})
    try:
        # The marker is printed as SHOWN, never echoed as typed.
        shell.send(
            f"PS1='$ '; bind 'set bell-style none'; source {BASH_SCRIPT}; "
            f"_show() {{ printf '%s|' \"$@\" > {out}; echo SHO''WN; }}; echo READ''Y\n"
        )
        shell.read_until(b"READY")
        yield shell, out
    finally:
        shell.close()


@pytest.mark.parametrize(
    ("typed", "line"),
    [
        ("pytunnel -o StrictHostKeyChecking=acc", "pytunnel|-o|StrictHostKeyChecking=accept-new|"),
        ("pytunnel -o Stric", "pytunnel|-o|StrictHostKeyChecking=|"),
        ("pytunnel -D 1080 bob@alp", "pytunnel|-D|1080|bob@alpha|"),
        ("pytunnel --pidf", "pytunnel|--pidfile|"),
    ],
)
def test_bash_real_readline(interactive_bash: tuple[Pty, Path], typed: str, line: str) -> None:
    """Through readline itself: TAB, then run the line (as _show's arguments)."""
    shell, out = interactive_bash
    shell.send(typed + "\t")
    time.sleep(0.3)
    shell.send("\x01_show \r")  # Ctrl-A: to the start of the line
    shell.read_until(b"SHOWN")
    assert out.read_text() == line


# -- zsh -------------------------------------------------------------------------------

# Drives an interactive zsh on a zpty: compinit with completions/ first in $fpath, a
# compadd that also records each match it is given, then TAB on the line.
ZSH_DRIVER = r"""
zmodload zsh/zpty || exit 3
zpty -b z zsh -f -i
zpty -w z "PROMPT='' RPROMPT=''"
zpty -w z "fpath=($COMPLETIONS \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z 'compadd() { local -a m; builtin compadd -O m "$@";'\
' (( $#m )) && print -rl -- ${(@)m/#/MATCH:} >> $MATCHES; builtin compadd "$@"; }'
zpty -w z 'comppostfuncs=(__done); __done() { print DONE >> $MATCHES; }'
zpty -w z "bindkey '^I' complete-word"
zpty -n -w z "$LINE"$'\t'
repeat 150; do
  [[ -f $MATCHES ]] && grep -q '^DONE' $MATCHES && break
  sleep 0.1
done
zpty -d z
"""


def zsh_complete(line: str, home: Path, tmp_path: Path) -> set[str]:
    need("zsh")
    matches = tmp_path / "zsh-matches"
    matches.unlink(missing_ok=True)
    env = {
        **shell_env(home),
        "COMPLETIONS": str(ZSH_SCRIPT.parent),
        "MATCHES": str(matches),
        "LINE": line,
    }
    run = subprocess.run(
        ["zsh", "-f", "-c", ZSH_DRIVER], capture_output=True, text=True, env=env, timeout=60
    )
    if run.returncode == 3:
        pytest.skip("zsh has no zpty module")
    assert matches.exists(), run.stdout + run.stderr
    assert "DONE" in matches.read_text(), run.stdout + run.stderr
    return {
        line.removeprefix("MATCH:")
        for line in matches.read_text().splitlines()
        if line.startswith("MATCH:")
    }


def test_zsh_script_parses() -> None:
    need("zsh")
    run = subprocess.run(["zsh", "-n", str(ZSH_SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_zsh_completes(home: Path, tmp_path: Path) -> None:
    assert zsh_complete("pytunnel -o Str", home, tmp_path) == {"StrictHostKeyChecking"}
    assert zsh_complete("pytunnel -o StrictHostKeyChecking=a", home, tmp_path) == {
        "ask",
        "accept-new",
    }
    assert zsh_complete("pytunnel -D 1080 ", home, tmp_path) == HOSTS
    assert zsh_complete("pytunnel -D 1080 bob@al", home, tmp_path) == {"alpha"}
    assert "--pidfile" in zsh_complete("pytunnel --pid", home, tmp_path)


# -- fish ------------------------------------------------------------------------------


def fish_complete(line: str, home: Path) -> set[str]:
    need("fish")
    run = subprocess.run(
        ["fish", "--no-config", "-c", f"source {FISH_SCRIPT}; complete -C $LINE"],
        capture_output=True,
        text=True,
        env={**shell_env(home), "LINE": line},
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    return {entry.split("\t")[0] for entry in run.stdout.splitlines()}


def test_fish_script_parses() -> None:
    need("fish")
    run = subprocess.run(["fish", "-n", str(FISH_SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_fish_completes(home: Path) -> None:
    assert fish_complete("pytunnel -o Str", home) == {"StrictHostKeyChecking="}
    assert fish_complete("pytunnel -o StrictHostKeyChecking=a", home) == {
        "StrictHostKeyChecking=ask",
        "StrictHostKeyChecking=accept-new",
    }
    assert fish_complete("pytunnel -oStrictHostKeyChecking=a", home) == {
        "-oStrictHostKeyChecking=ask",
        "-oStrictHostKeyChecking=accept-new",
    }
    assert fish_complete("pytunnel -D 1080 ", home) == HOSTS
    assert fish_complete("pytunnel -D 1080 bob@al", home) == {"bob@alpha"}
    assert fish_complete("pytunnel -D 1080 alpha ", home) == set()
    assert fish_complete("pytunnel --pidf", home) == {"--pidfile"}


# -- installed by the wheel ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_man_page_and_completions(tmp_path: Path) -> None:
    """Built from a copy of what the build reads, so it leaves nothing in the work tree."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("tunnel", "completions", "man"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    out = tmp_path / "wheels"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = out.glob("pytunnel_ssh-*.whl")  # the distribution, not the command
    expected = {
        "share/man/man1/pytunnel.1": ROOT / "man" / "pytunnel.1",
        "share/bash-completion/completions/pytunnel.bash": BASH_SCRIPT,
        "share/zsh/site-functions/_pytunnel": ZSH_SCRIPT,
        "share/fish/vendor_completions.d/pytunnel.fish": FISH_SCRIPT,
    }
    with zipfile.ZipFile(wheel) as archive:
        data = {
            name.split(".data/data/", 1)[1]: name
            for name in archive.namelist()
            if ".data/data/" in name
        }
        for target, committed in expected.items():
            assert target in data, f"{target} not in {sorted(data)}"
            assert archive.read(data[target]) == committed.read_bytes()

"""Questions on a real terminal: host keys, passphrases, passwords, keyboard-interactive.

pytunnel runs on a pseudo-terminal (its controlling terminal, so ``/dev/tty`` works) with
stdout and stderr in files: the transcript is what a person sees asked, the files are what
pytunnel printed. Secrets must never show up in either, nor in ``/proc/PID/cmdline``.
Without a terminal, or with BatchMode, nothing is ever asked.

The same questions are also put to an in-process :class:`~tunnel.session.Session` with a
scripted prompter, which pins the session's side of the conversation without a terminal.
"""

from __future__ import annotations

import asyncio
import os
import pty
import select
import shutil
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh
import pytest
from fixtures.asyncssh_server import ALICE, OTP_CODE, OTP_INSTRUCTIONS, OTP_USER, AsyncsshServer
from fixtures.pytunnel_proc import PYTUNNEL, Finished, error_lines, run_pytunnel, server_args
from fixtures.sshd import SshdServer

from tunnel import events
from tunnel.config import Config, Destination, HostKeyPolicy
from tunnel.errors import AuthenticationFailed, HostKeyRejected, SessionError
from tunnel.session import Session
from tunnel.ui import TerminalPrompter

pexpect = pytest.importorskip("pexpect")

from fixtures.pty_driver import PtyTunnel  # noqa: E402 (needs pexpect)

pytestmark = pytest.mark.timeout(90)

HOST_KEY_QUESTION = "Are you sure you want to continue connecting (yes/no/[fingerprint])? "
PASSPHRASE = "correct horse battery"
StartPty = Callable[..., PtyTunnel]


@pytest.fixture
def start_pty(tmp_path: Path) -> Iterator[StartPty]:
    """``start_pty(args) -> PtyTunnel``; every one is stopped by PID at teardown."""
    started: list[PtyTunnel] = []

    def start(args: list[str], **kwargs: object) -> PtyTunnel:
        workdir = tmp_path / f"pty{len(started)}"
        running = PtyTunnel(args, workdir, **kwargs)  # type: ignore[arg-type]
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.kill()


def without_strict(args: list[str]) -> list[str]:
    """``server_args`` minus its StrictHostKeyChecking, so the default policy applies."""
    out: list[str] = []
    index = 0
    while index < len(args):
        if args[index] == "-o" and args[index + 1].startswith("StrictHostKeyChecking="):
            index += 2
            continue
        out.append(args[index])
        index += 1
    return out


def fingerprint(public_line: str) -> str:
    return str(asyncssh.import_public_key(public_line).get_fingerprint("sha256"))


def host_name(server: SshdServer | AsyncsshServer) -> str:
    return f"[{server.host}]:{server.port}"


def assert_secret_nowhere(running: PtyTunnel, secret: str) -> None:
    """Not in stdout (JSON), stderr, the terminal (echo off) or the command line."""
    if running.child.isalive():
        assert secret.encode() not in running.cmdline()
    assert secret not in running.stdout_text(), running.describe()
    assert secret not in running.stderr_text(), running.describe()
    assert secret not in running.transcript, "echoed on the terminal\n" + running.describe()


def no_tty_run(args: list[str]) -> Finished:
    """pytunnel with no controlling terminal at all (a new session, stdin /dev/null)."""
    setsid = shutil.which("setsid")
    if setsid is None:
        pytest.skip("setsid not installed")
    return run_pytunnel(args, executable=[setsid, "-w", str(PYTUNNEL)])


def make_encrypted_key(path: Path, *extra: str) -> Path:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen not installed")
    subprocess.run(
        [keygen, "-q", *extra, "-N", PASSPHRASE, "-C", "encrypted", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    return path


def authorize(server: SshdServer, key: Path) -> None:
    pub = " ".join(key.with_name(key.name + ".pub").read_text().split()[:2])
    with server.authorized_keys.open("a") as handle:
        handle.write(pub + "\n")


@pytest.fixture
def empty_known_hosts(tmp_path: Path) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text("")
    return path


@pytest.fixture
def encrypted_key_sshd(
    make_sshd: Callable[..., SshdServer], tmp_path: Path
) -> tuple[SshdServer, Path]:
    """A private sshd that also accepts a passphrase-protected ed25519 key (OpenSSH
    format, as ``ssh-keygen -N`` writes it)."""
    key = make_encrypted_key(tmp_path / "encrypted_ed25519", "-t", "ed25519")
    server = make_sshd()
    authorize(server, key)
    return server, key


# == on a real terminal ====================================================================

# -- host keys -----------------------------------------------------------------------------


def ask_host_key(
    sshd: SshdServer, start_pty: StartPty, known_hosts: Path, *extra: str
) -> PtyTunnel:
    args = without_strict(server_args(sshd, known_hosts=known_hosts))
    # extra goes first: the first value of an -o key wins.
    running = start_pty(["--json", "-D", "127.0.0.1:0", *extra, *args])
    running.expect(
        f"The authenticity of host '{host_name(sshd)} ({sshd.host})' can't be established."
    )
    running.expect(f"ED25519 key fingerprint is {fingerprint(sshd.host_key_pub)}.")
    running.expect(HOST_KEY_QUESTION)
    return running


def test_prompter_opens_the_controlling_terminal() -> None:
    """The root of every terminal question: on a pty, there is a prompter."""
    probe = "from tunnel.ui import TerminalPrompter; print('prompter:', TerminalPrompter.open())"
    child = pexpect.spawn(
        str(PYTUNNEL.with_name("python")), ["-c", probe], encoding="utf-8", timeout=20
    )
    try:
        child.expect(pexpect.EOF)
        output = str(child.before)
    finally:
        child.close(force=True)
    assert "prompter: " in output
    assert "prompter: None" not in output


@pytest.mark.parametrize("answer", ["yes", "fingerprint"])
def test_host_key_prompt_accepted_records_the_key(
    sshd: SshdServer, start_pty: StartPty, empty_known_hosts: Path, answer: str
) -> None:
    running = ask_host_key(sshd, start_pty, empty_known_hosts)
    running.answer(fingerprint(sshd.host_key_pub) if answer == "fingerprint" else "yes")
    ready = running.wait_event("ready")
    assert ready["server"] == f"{sshd.user}@{sshd.host}:{sshd.port}"
    lines = empty_known_hosts.read_text().splitlines()
    assert [line.split()[:3] for line in lines] == [[host_name(sshd), *sshd.host_key_pub.split()]]
    assert running.stop() == 0, running.describe()


def test_host_key_prompt_shows_the_fingerprint_and_outlasts_the_connect_timeout(
    sshd: SshdServer, start_pty: StartPty, empty_known_hosts: Path
) -> None:
    # Time spent reading the question is not connection time (ssh does the same).
    running = ask_host_key(sshd, start_pty, empty_known_hosts, "-o", "ConnectTimeout=1")
    assert fingerprint(sshd.host_key_pub) in running.transcript
    time.sleep(2.5)  # longer than ConnectTimeout, on purpose
    running.answer("yes")
    running.wait_event("ready")
    assert running.stop() == 0, running.describe()


def test_ctrl_c_at_the_host_key_prompt_exits_130_at_once(
    sshd: SshdServer, start_pty: StartPty, empty_known_hosts: Path
) -> None:
    running = ask_host_key(sshd, start_pty, empty_known_hosts)
    running.send_control("c")
    assert running.wait_exit() == 130, running.describe()
    assert "Traceback" not in running.transcript
    assert empty_known_hosts.read_text() == ""


def test_host_key_prompt_reasks_on_nonsense_then_no_refuses(
    sshd: SshdServer, start_pty: StartPty, empty_known_hosts: Path
) -> None:
    running = ask_host_key(sshd, start_pty, empty_known_hosts)
    running.answer("maybe")
    running.expect("Please type 'yes', 'no' or the fingerprint: ")
    running.answer("no")
    assert running.wait_exit() == 255, running.describe()
    assert empty_known_hosts.read_text() == ""
    [line] = error_lines(running.stderr_text())
    assert "not accepted" in line
    assert fingerprint(sshd.host_key_pub) in line
    [error] = running.events()
    assert (error["event"], error["exit_status"]) == ("error", 255)


def test_host_key_prompt_writes_hashed_names_to_a_hashed_file(
    sshd: SshdServer, start_pty: StartPty, tmp_path: Path
) -> None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen not installed")
    known = tmp_path / "known_hosts_hashed"
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    known.write_text(f"[127.0.0.1]:1 {other}\n")
    subprocess.run(
        [keygen, "-q", "-H", "-f", str(known)], check=True, capture_output=True, timeout=30
    )
    assert known.read_text().startswith("|1|")
    running = ask_host_key(sshd, start_pty, known)
    running.answer("yes")
    running.wait_event("ready")
    lines = known.read_text().splitlines()
    assert len(lines) == 2, lines
    name, *key = lines[1].split()
    assert name.startswith("|1|"), lines
    assert key[:2] == sshd.host_key_pub.split()
    assert host_name(sshd) not in known.read_text()
    # ssh's own tool finds the host under the hashed name.
    found = subprocess.run(
        [keygen, "-F", host_name(sshd), "-f", str(known)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert found.returncode == 0, found
    assert sshd.host_key_pub.split()[1] in found.stdout
    assert running.stop() == 0


def test_host_key_prompt_when_only_port_22_of_the_host_is_known(
    sshd: SshdServer, start_pty: StartPty, tmp_path: Path
) -> None:
    # ssh: "host" and "[host]:port" are two hosts; another key for port 22 makes this
    # port's key unknown (a question), not changed (a refusal).
    known = tmp_path / "known_hosts_port22"
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    known.write_text(f"{sshd.host} {other}\n")
    running = ask_host_key(sshd, start_pty, known)
    running.answer("yes")
    running.wait_event("ready")
    lines = known.read_text().splitlines()
    assert [line.split()[:3] for line in lines] == [
        [sshd.host, *other.split()[:2]],
        [host_name(sshd), *sshd.host_key_pub.split()],
    ]
    assert running.stop() == 0


def test_batch_mode_never_asks_about_a_host_key(
    sshd: SshdServer, start_pty: StartPty, empty_known_hosts: Path
) -> None:
    args = without_strict(server_args(sshd, known_hosts=empty_known_hosts))
    running = start_pty(["-o", "BatchMode=yes", "-D", "127.0.0.1:0", *args])
    assert running.wait_exit() == 255, running.describe()
    assert running.transcript.strip() == "", running.describe()
    [line] = error_lines(running.stderr_text())
    assert "not known" in line
    assert empty_known_hosts.read_text() == ""


def test_no_terminal_never_asks_and_refuses_an_unknown_key(
    sshd: SshdServer, empty_known_hosts: Path
) -> None:
    args = without_strict(server_args(sshd, known_hosts=empty_known_hosts))
    result = no_tty_run(["--json", "-D", "127.0.0.1:0", *args])
    assert result.returncode == 255, result.describe()
    assert "continue connecting" not in result.stdout + result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith(f"pytunnel: host key for {host_name(sshd)} is not known")
    assert [event["event"] for event in result.events] == ["error"]
    assert empty_known_hosts.read_text() == ""


# -- passphrases ---------------------------------------------------------------------------


def test_passphrase_prompt_reasks_then_connects(
    encrypted_key_sshd: tuple[SshdServer, Path], start_pty: StartPty
) -> None:
    server, key = encrypted_key_sshd
    running = start_pty(["--json", "-D", "127.0.0.1:0", *server_args(server, key=key)])
    prompt = f"Enter passphrase for key '{key}': "
    running.expect(prompt)
    running.answer_secret("not the passphrase")
    running.expect("Bad passphrase, try again.")
    running.expect(prompt)
    running.answer_secret(PASSPHRASE)
    running.wait_event("ready")
    assert_secret_nowhere(running, PASSPHRASE)
    assert "not the passphrase" not in running.transcript
    assert running.stop() == 0


def test_no_terminal_never_asks_for_a_passphrase(
    encrypted_key_sshd: tuple[SshdServer, Path],
) -> None:
    server, key = encrypted_key_sshd
    result = no_tty_run(["-D", "127.0.0.1:0", *server_args(server, key=key)])
    assert result.returncode == 255, result.describe()
    assert "passphrase for key" not in result.stdout + result.stderr
    [line] = error_lines(result.stderr)
    assert "passphrase" in line.lower()  # says why the key was of no use


# -- passwords and keyboard-interactive (the asyncssh server) ------------------------------


def password_args(server: AsyncsshServer, user: str, *extra: str) -> list[str]:
    # The client key is authorized for every user there: turn publickey off so the
    # password is what logs in.
    return ["-o", "PubkeyAuthentication=no", *extra, *server_args(server, user=user)]


def test_password_prompt_connects(asyncssh_server: AsyncsshServer, start_pty: StartPty) -> None:
    user, password = ALICE
    running = start_pty(["--json", "-D", "127.0.0.1:0", *password_args(asyncssh_server, user)])
    running.expect(f"{user}@{asyncssh_server.host}:{asyncssh_server.port}'s password: ")
    running.answer_secret(password)
    running.wait_event("ready")
    assert_secret_nowhere(running, password)
    assert running.stop() == 0


def test_three_wrong_passwords_are_permission_denied(
    asyncssh_server: AsyncsshServer, start_pty: StartPty
) -> None:
    user, _ = ALICE
    running = start_pty(["--json", "-D", "127.0.0.1:0", *password_args(asyncssh_server, user)])
    guesses = ["guess-one", "guess-two", "guess-three"]
    for number, guess in enumerate(guesses):
        if number:
            running.expect("Permission denied, please try again.")
        running.expect("'s password: ")
        running.answer_secret(guess)
    assert running.wait_exit() == 255, running.describe()
    assert running.transcript.count("'s password: ") == 3, running.describe()
    [line] = error_lines(running.stderr_text())
    assert "permission denied" in line.lower()
    assert "3 password(s)" in line
    [error] = running.events()
    assert (error["event"], error["exit_status"]) == ("error", 255)
    for guess in guesses:
        assert_secret_nowhere(running, guess)


def test_keyboard_interactive_shows_instructions_and_asks_both(
    asyncssh_server: AsyncsshServer, start_pty: StartPty
) -> None:
    password = ALICE[1]
    args = password_args(asyncssh_server, OTP_USER)
    running = start_pty(["--json", "-D", "127.0.0.1:0", *args])
    running.expect(OTP_INSTRUCTIONS)
    running.expect("Password: ")
    running.answer_secret(password)
    running.expect("Verification code: ")
    running.answer(OTP_CODE)
    running.expect(OTP_CODE)  # echo on for this one: the person sees what they type
    running.wait_event("ready")
    assert_secret_nowhere(running, password)
    assert OTP_CODE not in running.stdout_text() + running.stderr_text()
    assert running.stop() == 0


def test_batch_mode_never_asks_for_a_password(
    asyncssh_server: AsyncsshServer, start_pty: StartPty
) -> None:
    user, _ = ALICE
    args = password_args(asyncssh_server, user, "-o", "BatchMode=yes")
    running = start_pty(["-D", "127.0.0.1:0", *args])
    assert running.wait_exit() == 255, running.describe()
    assert running.transcript.strip() == "", running.describe()
    [line] = error_lines(running.stderr_text())
    assert "permission denied" in line.lower()
    assert "no password was asked for" in line


def test_no_terminal_never_asks_for_a_password(asyncssh_server: AsyncsshServer) -> None:
    user, _ = ALICE
    result = no_tty_run(["-D", "127.0.0.1:0", *password_args(asyncssh_server, user)])
    assert result.returncode == 255, result.describe()
    assert "password:" not in result.stdout + result.stderr
    [line] = error_lines(result.stderr)
    assert "permission denied" in line.lower()
    assert "no password was asked for" in line


# == the session's side, with a scripted prompter ==========================================


class ScriptedPrompter:
    """Answers questions from a list; notes every question and every line shown."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, bool]] = []
        self.shown: list[str] = []
        self._lock = threading.Lock()

    def ask(self, prompt: str, echo: bool) -> str | None:
        with self._lock:
            self.asked.append((prompt, echo))
            return self.answers.pop(0) if self.answers else None

    def confirm(self, question: str) -> str | None:
        return self.ask(question, True)

    def show(self, text: str) -> None:
        with self._lock:
            self.shown.append(text)

    def pause(self) -> None:
        """The live view would stop here; nothing to do without one."""

    def resume(self) -> None:
        """The live view would come back here."""

    def interrupt(self) -> None:
        with self._lock:
            self.shown.append("<interrupted>")


def session_config(server: SshdServer | AsyncsshServer, user: str, **fields: object) -> Config:
    settings: dict[str, object] = {
        "ssh_config": (),
        "known_hosts": (server.known_hosts,),
        "global_known_hosts": (),
        "host_key_policy": HostKeyPolicy.YES,
        "connect_timeout": 8.0,
        **fields,
    }
    return Config(Destination(server.host, user, server.port), **settings)  # type: ignore[arg-type]


async def connect(config: Config, prompter: ScriptedPrompter) -> Session:
    session = Session(config, events.discard, prompter)
    await session.connect()
    assert session.connection is not None
    return session


def password_config(server: AsyncsshServer, user: str, **fields: object) -> Config:
    return session_config(server, user, auth_methods={"publickey": False}, **fields)


async def test_session_password_right_first_time_with_password_preferred(
    asyncssh_server: AsyncsshServer,
) -> None:
    user, password = ALICE
    prompter = ScriptedPrompter(password)
    config = password_config(asyncssh_server, user, preferred_auth=("password",))
    session = await connect(config, prompter)
    await session.close()
    where = f"{user}@{asyncssh_server.host}:{asyncssh_server.port}"
    assert prompter.asked == [(f"{where}'s password: ", False)]


@pytest.mark.slow
async def test_session_password_with_the_default_method_order(
    asyncssh_server: AsyncsshServer,
) -> None:
    user, password = ALICE
    prompter = ScriptedPrompter(password)
    config = password_config(asyncssh_server, user, connect_timeout=4.0)
    session = await connect(config, prompter)
    await session.close()
    assert [echo for _, echo in prompter.asked] == [False]


async def test_session_three_wrong_passwords(asyncssh_server: AsyncsshServer) -> None:
    user, _ = ALICE
    prompter = ScriptedPrompter("one", "two", "three", "never asked")
    config = password_config(asyncssh_server, user, preferred_auth=("password",))
    with pytest.raises(AuthenticationFailed) as caught:
        await connect(config, prompter)
    # The "try again" goes with the next question, in one piece.
    assert len(prompter.asked) == 3
    again = [q for q, _ in prompter.asked if q.startswith("Permission denied, please try again.\n")]
    assert len(again) == 2
    assert "permission denied" in str(caught.value).lower()
    assert "3 password(s)" in str(caught.value)
    assert caught.value.exit_status == 255
    for secret in ("one", "two", "three"):
        assert f" {secret} " not in f" {caught.value} "


async def test_session_keyboard_interactive(asyncssh_server: AsyncsshServer) -> None:
    prompter = ScriptedPrompter(ALICE[1], OTP_CODE)
    session = await connect(password_config(asyncssh_server, OTP_USER), prompter)
    await session.close()
    # The server's instructions come with the first question, in one piece.
    [(first, first_echo), second] = prompter.asked
    assert first.startswith(OTP_INSTRUCTIONS)
    assert first.endswith("Password: ")
    assert not first_echo
    assert second == ("Verification code: ", True)


async def test_session_batch_mode_asks_nothing(asyncssh_server: AsyncsshServer) -> None:
    user, _ = ALICE
    prompter = ScriptedPrompter(ALICE[1])
    with pytest.raises(AuthenticationFailed) as caught:
        await connect(password_config(asyncssh_server, user, batch_mode=True), prompter)
    assert prompter.asked == []
    assert "no password was asked for" in str(caught.value)


@pytest.mark.parametrize("answer", ["yes", "YES", "fingerprint"])
async def test_session_host_key_asked_and_accepted(
    sshd: SshdServer, empty_known_hosts: Path, answer: str
) -> None:
    reply = fingerprint(sshd.host_key_pub) if answer == "fingerprint" else answer
    prompter = ScriptedPrompter(reply)
    config = session_config(
        sshd,
        sshd.user,
        identities=(sshd.client_key,),
        known_hosts=(str(empty_known_hosts),),
        host_key_policy=None,  # not given: ask
    )
    session = await connect(config, prompter)
    await session.close()
    # Host, key type and fingerprint are part of the question itself, so nothing (a live
    # view redrawing) can come between them and the answer.
    assert prompter.asked == [
        (
            f"The authenticity of host '{host_name(sshd)} ({sshd.host})' can't be "
            f"established.\nED25519 key fingerprint is {fingerprint(sshd.host_key_pub)}.\n"
            + HOST_KEY_QUESTION,
            True,
        )
    ]
    recorded = await asyncio.to_thread(empty_known_hosts.read_text)
    assert recorded.split()[:3] == [
        host_name(sshd),
        *sshd.host_key_pub.split(),
    ]


async def test_session_host_key_declined(sshd: SshdServer, empty_known_hosts: Path) -> None:
    prompter = ScriptedPrompter("sure", "no")
    config = session_config(
        sshd,
        sshd.user,
        identities=(sshd.client_key,),
        known_hosts=(str(empty_known_hosts),),
        host_key_policy=HostKeyPolicy.ASK,
    )
    with pytest.raises(HostKeyRejected) as caught:
        await connect(config, prompter)
    first, again = (question for question, _ in prompter.asked)
    assert first.endswith(HOST_KEY_QUESTION)
    assert again == "Please type 'yes', 'no' or the fingerprint: "
    assert "not accepted" in str(caught.value)
    assert await asyncio.to_thread(empty_known_hosts.read_text) == ""


@pytest.mark.parametrize(
    "key_type",
    [
        pytest.param(
            ("-t", "ed25519"),
            id="openssh-ed25519",
        ),
        pytest.param(
            ("-t", "rsa", "-b", "2048", "-m", "PEM"),
            id="pem-rsa",
        ),
    ],
)
async def test_session_passphrase_reasked_then_accepted(
    make_sshd: Callable[..., SshdServer], tmp_path: Path, key_type: tuple[str, ...]
) -> None:
    key = make_encrypted_key(tmp_path / "encrypted", *key_type)
    server = make_sshd()
    authorize(server, key)
    prompter = ScriptedPrompter("wrong passphrase", PASSPHRASE)
    config = session_config(server, server.user, identities=(str(key),))
    try:
        session = await connect(config, prompter)
    except SessionError as exc:
        raise AssertionError(f"{exc}; asked {prompter.asked}, shown {prompter.shown}") from exc
    await session.close()
    prompt = f"Enter passphrase for key '{key}': "
    assert prompter.asked == [(prompt, False), ("Bad passphrase, try again.\n" + prompt, False)]


# == the prompter itself ===================================================================


class _WatchedTty:
    """The terminal as TerminalPrompter uses it (write, flush, readline, fileno) on the
    slave side of a pty, noting whether echo was on whenever something visible was
    written."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.echo_at_write: list[bool] = []

    def write(self, text: str) -> int:
        if text.strip():
            self.echo_at_write.append(bool(termios.tcgetattr(self.fd)[3] & termios.ECHO))
        return os.write(self.fd, text.encode())

    def flush(self) -> None:
        pass

    def readline(self) -> str:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(self.fd, 1)
            if not chunk:
                break
            line += chunk
        return line.decode()

    def fileno(self) -> int:
        return self.fd


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    seen = b""
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise AssertionError(f"no {needle!r} within {timeout:g} s (got {seen!r})")
        seen += os.read(fd, 1024)
    return seen


def test_secret_prompt_is_written_with_echo_already_off() -> None:
    master, slave = pty.openpty()
    tty = _WatchedTty(slave)
    answers: list[str | None] = []
    prompter = TerminalPrompter(tty)  # type: ignore[arg-type]
    worker = threading.Thread(
        target=lambda: answers.append(prompter.ask("pw: ", False)), daemon=True
    )
    try:
        worker.start()
        _read_until(master, b"pw: ", 10)
        # Answer only once echo is off, so this test never races the prompter itself.
        deadline = time.monotonic() + 10
        while termios.tcgetattr(slave)[3] & termios.ECHO and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(master, b"hunter2\n")
        worker.join(10)
        assert answers == ["hunter2"]
        assert termios.tcgetattr(slave)[3] & termios.ECHO, "echo is back on afterwards"
    finally:
        os.close(slave)
        os.close(master)
    assert tty.echo_at_write[0] is False, "the prompt was written while echo was on"

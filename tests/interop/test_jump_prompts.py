"""Jump hosts on a real terminal: a passphrase-protected key used for the jump host and
the server is asked about once, as it was before each hop had settings of its own."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.pytunnel_proc import server_args
from fixtures.sshd import SshdServer

pexpect = pytest.importorskip("pexpect")

from fixtures.pty_driver import PtyTunnel  # noqa: E402 (needs pexpect)

pytestmark = pytest.mark.timeout(90)

PASSPHRASE = "jump passphrase"


def encrypted_key(path: Path) -> Path:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen not installed")
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", PASSPHRASE, "-C", "jump", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    return path


def test_one_passphrase_question_for_a_key_every_hop_uses(
    make_sshd: Callable[..., SshdServer], tmp_path: Path
) -> None:
    jump, target = make_sshd(), make_sshd()
    key = encrypted_key(tmp_path / "jump_ed25519")
    public = " ".join(key.with_name(key.name + ".pub").read_text().split()[:2])
    for server in (jump, target):
        server.authorized_keys.write_text(public + "\n")
    known = tmp_path / "known_hosts"
    known.write_text(Path(jump.known_hosts).read_text() + Path(target.known_hosts).read_text())
    args = [
        "--json", "-D", "127.0.0.1:0",
        "-J", f"{jump.user}@{jump.host}:{jump.port}",
        *server_args(target, key=key, known_hosts=known),
    ]  # fmt: skip
    running = PtyTunnel(args, tmp_path / "pty")
    try:
        prompt = f"Enter passphrase for key '{key}': "
        running.expect(prompt)
        running.answer_secret(PASSPHRASE)
        running.wait_event("ready")
        assert running.transcript.count(prompt) == 1, running.describe()
        assert running.stop() == 0
    finally:
        running.kill()

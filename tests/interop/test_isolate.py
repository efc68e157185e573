"""``--isolate`` against the real OpenSSH sshd with curl: proxy users with different
SOCKS5 or HTTP Basic user names are seen by sshd as different SSH connections, the same
name reuses its connection, a client without a name uses the command line's session, an
isolated connection closes once idle, and with ``--proxy-auth`` a wrong password is
still refused.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.event_fence import fence, since, wait_since
from fixtures.pytunnel_proc import (
    Running,
    clean_env,
    connect_proxy,
    recv_exact,
    running_pytunnel,
    server_args,
    socks5_greeting,
    socks5_request,
)
from fixtures.sshd import SshdServer
from fixtures.targets import HttpTarget

pytestmark = pytest.mark.timeout(90)

CURL_TIMEOUT = 30.0
ACCEPTED = re.compile(r"Accepted publickey for \S+ from \S+ port (\d+)")


@pytest.fixture(scope="module")
def isolating(sshd: SshdServer) -> Iterator[Running]:
    with running_pytunnel(["-D", "127.0.0.1:0", "--isolate", *server_args(sshd)]) as running:
        yield running


def curl_ok(curl: str, proxy: str, url: str) -> None:
    done = subprocess.run(
        [curl, "--silent", "--show-error", "--fail", "--max-time", str(CURL_TIMEOUT),
         "--proxy", proxy, url],
        capture_output=True,
        timeout=CURL_TIMEOUT + 10,
        env=clean_env(),
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.startswith(b"hello")


def ssh_logins(sshd: SshdServer, mark: int) -> set[str]:
    """The client ports of the SSH connections sshd accepted since ``mark``."""
    return set(ACCEPTED.findall(sshd.log_text(mark)))


@pytest.mark.parametrize("scheme", ["socks5h", "http"])
def test_different_user_names_never_share_an_ssh_connection(
    isolating: Running, sshd: SshdServer, http_target: HttpTarget, curl: str, scheme: str
) -> None:
    before = fence(isolating)
    mark = sshd.log_mark()
    alice, bob = f"alice-{scheme}", f"bob-{scheme}"
    for user in (alice, bob, alice):
        curl_ok(curl, f"{scheme}://{user}:any-secret@{isolating.netloc}", http_target.url())
    # No name: the command line's session, already up, so no new SSH connection.
    curl_ok(curl, f"{scheme}://{isolating.netloc}", http_target.url())

    ups = wait_since(isolating, before, "isolated_session", 2, state="up")
    assert sorted(ev["isolation"] for ev in ups) == sorted([alice, bob])
    assert len(ssh_logins(sshd, mark)) == 2, sshd.log_text(mark)
    opened = since(isolating, before, "channel_opened")
    assert [ev.get("isolation") for ev in opened] == [alice, bob, alice, None]
    assert since(isolating, before, "isolated_session", state="up") == ups
    assert "any-secret" not in isolating.stdout_text() + isolating.stderr_text()


def test_isolated_connection_closes_when_idle(
    sshd: SshdServer, http_target: HttpTarget, curl: str
) -> None:
    args = ["-D", "127.0.0.1:0", "--isolate", "--isolate-idle", "0.5", *server_args(sshd)]
    with running_pytunnel(args) as tunnel:
        curl_ok(curl, f"socks5h://carol:x@{tunnel.netloc}", http_target.url())
        closed = tunnel.wait_event("isolated_session", state="closed")
        assert closed["isolation"] == "carol"
        assert "no connection for 0.5 s" in closed["reason"]
        # The next request of that name connects afresh.
        mark = sshd.log_mark()
        curl_ok(curl, f"socks5h://carol:x@{tunnel.netloc}", http_target.url())
        assert len(ssh_logins(sshd, mark)) == 1


def test_with_proxy_auth_a_wrong_password_is_still_refused(
    sshd: SshdServer, http_target: HttpTarget, curl: str
) -> None:
    args = ["-D", "127.0.0.1:0", "--isolate", "--proxy-auth", "dave", *server_args(sshd)]
    env = {"PYTUNNEL_PROXY_PASSWORD": "right-one"}
    with running_pytunnel(args, env=env) as tunnel:
        with connect_proxy(tunnel.address) as sock:
            sock.sendall(socks5_greeting(b"\x02"))
            assert recv_exact(sock, 2) == b"\x05\x02"
            sock.sendall(b"\x01\x04dave\x05wrong")
            assert recv_exact(sock, 2) == b"\x01\x01"
        refused = subprocess.run(
            [curl, "--silent", "--max-time", str(CURL_TIMEOUT), "--output", "/dev/null",
             "--write-out", "%{http_code}", "--proxy", f"http://dave:wrong@{tunnel.netloc}",
             http_target.url()],
            capture_output=True,
            timeout=CURL_TIMEOUT + 10,
            env=clean_env(),
            check=False,
        )  # fmt: skip
        assert refused.stdout == b"407"
        before = fence(tunnel)
        curl_ok(curl, f"socks5h://dave:right-one@{tunnel.netloc}", http_target.url())
        (opened,) = since(tunnel, before, "channel_opened")
        assert opened["isolation"] == "dave"


def test_socks5_without_credentials_is_still_served(isolating: Running) -> None:
    # A client offering only "no auth" gets it: --isolate adds a method, takes none away.
    with connect_proxy(isolating.address) as sock:
        sock.sendall(socks5_greeting(b"\x00"))
        assert recv_exact(sock, 2) == b"\x05\x00"
    with connect_proxy(isolating.address) as sock:
        sock.sendall(socks5_greeting(b"\x00\x02"))
        assert recv_exact(sock, 2) == b"\x05\x02"


def test_an_isolated_session_that_cannot_connect_is_reported_by_its_escaped_name(
    make_sshd: Callable[..., SshdServer], http_target: HttpTarget
) -> None:
    server = make_sshd()
    with running_pytunnel(["-D", "127.0.0.1:0", "--isolate", *server_args(server)]) as tunnel:
        # The command line's session stays up; new SSH connections are refused from now.
        server.stop(kill_sessions=False)
        name = b"gina\x1b[2J"
        with connect_proxy(tunnel.address) as sock:
            sock.sendall(socks5_greeting(b"\x02"))
            assert recv_exact(sock, 2) == b"\x05\x02"
            sock.sendall(bytes((1, len(name))) + name + b"\x01x")
            assert recv_exact(sock, 2) == b"\x01\x00"
            sock.sendall(socks5_request("127.0.0.1", http_target.port))
            assert recv_exact(sock, 2) == b"\x05\x01"  # general failure, honestly
        failed = tunnel.wait_event("isolated_session", state="failed")
        assert failed["isolation"] == "gina\\x1b[2J"
        assert failed["reason"]
        # Without a name, the command line's session still serves.
        before = fence(tunnel)
        with connect_proxy(tunnel.address) as sock:
            sock.sendall(socks5_greeting(b"\x00"))
            assert recv_exact(sock, 2) == b"\x05\x00"
            sock.sendall(socks5_request("127.0.0.1", http_target.port))
            assert recv_exact(sock, 2) == b"\x05\x00"
        assert wait_since(tunnel, before, "channel_opened")


def test_a_kept_alive_http_connection_never_carries_one_name_through_anothers_session(
    isolating: Running, sshd: SshdServer, http_target: HttpTarget
) -> None:
    # One client connection, two requests to the same origin under two names: the
    # second must not reuse the first's channel (it went through the first's session).
    before = fence(isolating)
    mark = sshd.log_mark()
    with connect_proxy(isolating.address) as sock:
        for user in (b"kept-hana", b"kept-ivan"):
            auth = base64.b64encode(user + b":x")
            sock.sendall(
                b"GET " + http_target.url().encode() + b" HTTP/1.1\r\n"
                b"Host: " + http_target.netloc.encode() + b"\r\n"
                b"Proxy-Authorization: Basic " + auth + b"\r\n\r\n"
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += recv_exact(sock, 1)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            assert recv_exact(sock, length).startswith(b"hello")
    opened = wait_since(isolating, before, "channel_opened", 2)
    assert [ev["isolation"] for ev in opened] == ["kept-hana", "kept-ivan"]
    assert len(ssh_logins(sshd, mark)) == 2, sshd.log_text(mark)


def test_a_routes_destination_isolates_too(
    sshd: SshdServer, http_target: HttpTarget, curl: str, tmp_path: Path
) -> None:
    # The route's destination is the same sshd under another alias: each user name gets
    # its own SSH connection there as well, besides the destination's own session.
    config = tmp_path / "ssh_config"
    config.write_text(
        "".join(
            f"Host {alias}\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n"
            f"  IdentityFile {sshd.client_key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {sshd.known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n"
            for alias in ("main", "lab")
        )
    )
    args = ["-D", "127.0.0.1:0", "--isolate", "-F", str(config)]
    args += ["--route", f"*:{http_target.port}=lab", "main"]
    with running_pytunnel(args) as tunnel:
        before = fence(tunnel)
        mark = sshd.log_mark()
        for user in ("alice", "bob", "alice"):
            curl_ok(curl, f"socks5h://{user}:pw@{tunnel.netloc}", http_target.url())
        opened = wait_since(tunnel, before, "channel_opened", 3)
        assert [(ev["isolation"], ev["upstream"]) for ev in opened] == [
            ("alice", "lab"),
            ("bob", "lab"),
            ("alice", "lab"),
        ]
        ups = since(tunnel, before, "isolated_session", state="up")
        assert sorted(ev["isolation"] for ev in ups) == ["alice", "bob"]
        # lab's own session (connected on first use) and one per name.
        assert len(ssh_logins(sshd, mark)) == 3, sshd.log_text(mark)

"""Headless Chromium through pytunnel and the real OpenSSH sshd: as an HTTP proxy, as a
SOCKS5 proxy, and through the PAC file pytunnel serves.

Chromium never proxies loopback by default; ``--proxy-bypass-list=<-loopback>`` turns
that off for ``--proxy-server``. It does not apply to a PAC script, and the PAC file
sends loopback and plain names DIRECT anyway, so the PAC test needs a destination that
is neither loopback nor a plain name to Chromium, yet reaches the loopback target at the
far end: ``0.0.0.0``. Chromium passes it to the PAC script and then, as a SOCKS5 host
name, to pytunnel; sshd connects to 0.0.0.0, which Linux routes to this host, where the
target listens on 127.0.0.1 (checked first with a plain connect). Nothing but the PAC
file told Chromium to speak SOCKS5 to that port, so a SOCKS5 request for 0.0.0.0 proves
that Chromium fetched and ran pytunnel's PAC file.

The tunnel allows only the target's port and denies everything else, so Chromium's own
background requests (update and account hosts) never reach sshd's resolver.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.event_fence import fence, since, wait_since
from fixtures.pytunnel_proc import Running, clean_env, running_pytunnel, server_args
from fixtures.sshd import SshdServer
from fixtures.targets import HttpTarget

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

CHROMIUM_TIMEOUT = 60.0
KILL_TIMEOUT = 10.0
LOG_TIMEOUT = 5.0
# Where Linux takes a connect to 0.0.0.0: this host.
THIS_HOST = "0.0.0.0"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium not installed (Debian package: chromium)")
    return path


@pytest.fixture(scope="module")
def tunnel(sshd: SshdServer, http_target: HttpTarget) -> Iterator[Running]:
    port = http_target.port
    rules = ["--allow", f"127.0.0.1:{port}", "--allow", f"{THIS_HOST}:{port}", "--deny", "*"]
    with running_pytunnel(["-D", "127.0.0.1:0", *rules, *server_args(sshd)]) as running:
        yield running


def run_chromium(chromium: str, home: Path, url: str, *proxy_args: str) -> str:
    """``chromium --dump-dom URL`` with a throwaway profile; returns the DOM. Chromium and
    its helpers run in a session of their own, killed by its id if anything is left."""
    profile = home / "profile"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *proxy_args,
        "--dump-dom",
        url,
    ]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env({"HOME": str(home)}),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        out, err = proc.communicate(timeout=KILL_TIMEOUT)
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT:g} s: {err[-2000:]!r}")
    finally:
        _kill_session(proc)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session Chromium leads (its pid is the group id), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(KILL_TIMEOUT)


def assert_through_tunnel(
    tunnel: Running,
    sshd: SshdServer,
    before: int,
    mark: int,
    host: str,
    port: int,
    protocol: str,
) -> None:
    assert wait_since(tunnel, before, "channel_opened", host=host, port=port)
    parsed = since(tunnel, before, "request_parsed", host=host, port=port)
    assert {ev["protocol"] for ev in parsed} == {protocol}
    assert sshd.wait_log(f"target {host} port {port}", LOG_TIMEOUT, mark)


def test_http_proxy(
    chromium: str, tunnel: Running, sshd: SshdServer, http_target: HttpTarget, tmp_path: Path
) -> None:
    before, mark = fence(tunnel), sshd.log_mark()
    dom = run_chromium(
        chromium,
        tmp_path,
        http_target.url("/hello"),
        f"--proxy-server=http://{tunnel.netloc}",
        "--proxy-bypass-list=<-loopback>",
    )
    assert http_target.hello_body.decode().strip() in dom
    assert_through_tunnel(tunnel, sshd, before, mark, "127.0.0.1", http_target.port, "http")


def test_socks5_proxy(
    chromium: str, tunnel: Running, sshd: SshdServer, http_target: HttpTarget, tmp_path: Path
) -> None:
    before, mark = fence(tunnel), sshd.log_mark()
    dom = run_chromium(
        chromium,
        tmp_path,
        http_target.url("/hello"),
        f"--proxy-server=socks5://{tunnel.netloc}",
        "--proxy-bypass-list=<-loopback>",
    )
    assert http_target.hello_body.decode().strip() in dom
    assert_through_tunnel(tunnel, sshd, before, mark, "127.0.0.1", http_target.port, "socks5")


def _reaches_target_at_this_host(port: int) -> bool:
    try:
        with socket.create_connection((THIS_HOST, port), timeout=5) as sock:
            sock.sendall(b"HEAD /hello HTTP/1.0\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def test_pac_file(
    chromium: str, tunnel: Running, sshd: SshdServer, http_target: HttpTarget, tmp_path: Path
) -> None:
    if not _reaches_target_at_this_host(http_target.port):
        pytest.skip(f"a connect to {THIS_HOST} does not reach this host here")
    before, mark = fence(tunnel), sshd.log_mark()
    dom = run_chromium(
        chromium,
        tmp_path,
        f"http://{THIS_HOST}:{http_target.port}/hello",
        f"--proxy-pac-url=http://{tunnel.netloc}/proxy.pac",
    )
    assert http_target.hello_body.decode().strip() in dom
    assert_through_tunnel(tunnel, sshd, before, mark, THIS_HOST, http_target.port, "socks5")
    # Chromium hands the host to the proxy as a name (remote resolution).
    parsed = since(tunnel, before, "request_parsed", host=THIS_HOST)
    assert all(ev["sent_name"] for ev in parsed)


@pytest.fixture(scope="module")
def auth_tunnel(sshd: SshdServer) -> Iterator[Running]:
    password = {"PYTUNNEL_PROXY_PASSWORD": "chromium-pac-pw"}
    args = ["-D", "127.0.0.1:0", "--proxy-auth", "bob", "--deny", "*", *server_args(sshd)]
    with running_pytunnel(args, env=password) as running:
        yield running


def test_pac_file_with_a_password_sends_chromium_to_the_http_proxy(
    chromium: str, auth_tunnel: Running, http_target: HttpTarget, tmp_path: Path
) -> None:
    # Chromium cannot log in to a SOCKS5 proxy; behind --proxy-auth the PAC file names
    # the HTTP proxy, which answers 407 and a browser asks its user for the password.
    # Headless, nobody answers: what counts is that Chromium spoke HTTP to the proxy.
    before = fence(auth_tunnel)
    run_chromium(
        chromium,
        tmp_path,
        f"http://{THIS_HOST}:{http_target.port}/hello",
        f"--proxy-pac-url=http://{auth_tunnel.netloc}/proxy.pac",
    )
    rejected = since(auth_tunnel, before, "client_rejected", auth=True)
    assert rejected, auth_tunnel.describe()
    assert {ev["reason"] for ev in rejected} == {"wrong proxy credentials (HTTP)"}


def test_pac_file_follows_the_routes(
    chromium: str,
    sshd: SshdServer,
    make_sshd: Callable[..., SshdServer],
    http_target: HttpTarget,
    tmp_path: Path,
) -> None:
    """One route direct, one through a second sshd: Chromium, told only the PAC URL,
    fetches the first itself (the PAC says DIRECT; the name is mapped to loopback inside
    Chromium, never looked up) and sends the second to pytunnel, which routes it."""
    if not _reaches_target_at_this_host(http_target.port):
        pytest.skip(f"a connect to {THIS_HOST} does not reach this host here")
    other = make_sshd()
    config = tmp_path / "ssh_config"
    config.write_text(
        "".join(
            f"Host {alias}\n  HostName {server.host}\n  Port {server.port}\n"
            f"  User {server.user}\n  IdentityFile {server.client_key}\n"
            f"  UserKnownHostsFile {server.known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n"
            for alias, server in (("main", sshd), ("other", other))
        )
    )
    port = http_target.port
    # Chromium's own background requests are refused here, so no name of theirs reaches
    # sshd's resolver.
    routes = ["--route", "direct.test=direct", "--route", f"*:{port}=other"]
    routes += ["--route", "*=reject"]
    args = ["-D", "127.0.0.1:0", "-F", str(config)]
    with running_pytunnel([*args, *routes, "main"]) as routed:
        pac = f"--proxy-pac-url=http://{routed.netloc}/proxy.pac"
        before, mark, main_mark = fence(routed), other.log_mark(), sshd.log_mark()
        dom = run_chromium(chromium, tmp_path, f"http://{THIS_HOST}:{port}/hello", pac)
        assert http_target.hello_body.decode().strip() in dom
        # (Chromium may ask for /favicon.ico too: every one went the route's way.)
        opened = wait_since(routed, before, "channel_opened", host=THIS_HOST, port=port)
        assert {event["upstream"] for event in opened} == {"other"}
        assert other.wait_log(f"target {THIS_HOST} port {port}", LOG_TIMEOUT, mark)
        assert f"target {THIS_HOST} port {port}" not in sshd.log_text(main_mark)

        before = fence(routed)
        dom = run_chromium(
            chromium,
            tmp_path,
            f"http://direct.test:{port}/hello",
            pac,
            "--host-resolver-rules=MAP direct.test 127.0.0.1",
        )
        assert http_target.hello_body.decode().strip() in dom
        # Chromium went there itself: pytunnel saw no request for it.
        assert not since(routed, before, "request_parsed", host="direct.test")

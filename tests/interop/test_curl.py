"""curl through pytunnel and the real OpenSSH sshd, in every SOCKS mode curl speaks.

The JSON event stream tells which protocol and address form curl really used, so a test
cannot pass by accident with a different mode (or with no proxy at all).
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.pytunnel_proc import (
    Running,
    clean_env,
    request_protocol,
    running_pytunnel,
    server_args,
)
from fixtures.sshd import SshdServer
from fixtures.targets import HttpTarget

pytestmark = pytest.mark.timeout(90)

CURL_TIMEOUT = 60.0
UPLOAD_SIZE = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def shared_tunnel(sshd: SshdServer) -> Iterator[Running]:
    with running_pytunnel(["-D", "127.0.0.1:0", *server_args(sshd)]) as running:
        yield running


def curl_args(curl: str, *args: str) -> list[str]:
    return [curl, "--silent", "--show-error", "--fail", "--max-time", str(CURL_TIMEOUT), *args]


def run_curl(curl: str, *args: str) -> bytes:
    result = subprocess.run(
        curl_args(curl, *args),
        capture_output=True,
        timeout=CURL_TIMEOUT + 10,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def new_requests(tunnel: Running, before: int, count: int) -> list[dict[str, Any]]:
    """The ``count`` request_parsed events after the first ``before`` ones."""
    events = tunnel.wait_events("request_parsed", before + count)[before:]
    assert len(events) == count, events
    return events


MODES = [
    # curl option, host in the URL, protocol pytunnel sees, whether a name was sent
    ("--socks4", "127.0.0.1", "socks4", False),
    ("--socks4a", "localhost", "socks4a", True),
    ("--socks5", "127.0.0.1", "socks5", False),
    ("--socks5-hostname", "localhost", "socks5", True),
]


@pytest.mark.parametrize(
    ("option", "host", "protocol", "sent_name"), MODES, ids=[m[0].strip("-") for m in MODES]
)
def test_big_download_in_every_mode(
    curl: str,
    shared_tunnel: Running,
    http_target: HttpTarget,
    option: str,
    host: str,
    protocol: str,
    sent_name: bool,
) -> None:
    before = len(shared_tunnel.events("request_parsed"))
    body = run_curl(curl, option, shared_tunnel.netloc, f"http://{host}:{http_target.port}/big")
    assert len(body) == http_target.big_size
    assert hashlib.sha256(body).hexdigest() == http_target.big_sha256
    [request] = new_requests(shared_tunnel, before, 1)
    assert (request_protocol(request), request["sent_name"]) == (protocol, sent_name)
    assert (request["host"], request["port"]) == (host, http_target.port)


@pytest.mark.parametrize("scheme", ["socks5h", "socks5", "socks4a", "socks4"])
def test_proxy_url_forms(
    curl: str, shared_tunnel: Running, http_target: HttpTarget, scheme: str
) -> None:
    before = len(shared_tunnel.events("request_parsed"))
    body = run_curl(
        curl,
        "-x",
        f"{scheme}://{shared_tunnel.netloc}",
        f"http://localhost:{http_target.port}/hello",
    )
    assert body == http_target.hello_body
    [request] = new_requests(shared_tunnel, before, 1)
    assert request["sent_name"] is scheme.endswith(("h", "a"))


def test_upload_post_body_round_trips(
    curl: str, shared_tunnel: Running, http_target: HttpTarget, tmp_path: Path
) -> None:
    upload = random.Random(20).randbytes(UPLOAD_SIZE)
    path = tmp_path / "upload.bin"
    path.write_bytes(upload)
    body = run_curl(
        curl,
        "--socks5-hostname",
        shared_tunnel.netloc,
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        f"@{path}",
        f"http://localhost:{http_target.port}/echo",
    )
    assert len(body) == UPLOAD_SIZE
    assert body == upload


def test_ipv6_target_by_address(
    curl: str, shared_tunnel: Running, http_target6: HttpTarget
) -> None:
    before = len(shared_tunnel.events("request_parsed"))
    body = run_curl(curl, "--globoff", "--socks5", shared_tunnel.netloc, http_target6.url("/big"))
    assert hashlib.sha256(body).hexdigest() == http_target6.big_sha256
    [request] = new_requests(shared_tunnel, before, 1)
    assert (request["host"], request["sent_name"]) == ("::1", False)


@pytest.mark.slow
def test_two_curls_at_once(curl: str, shared_tunnel: Running, http_target: HttpTarget) -> None:
    url = f"http://localhost:{http_target.port}/big"
    procs = [
        subprocess.Popen(
            curl_args(curl, "--socks5-hostname", shared_tunnel.netloc, url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        for _ in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=CURL_TIMEOUT + 10) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert hashlib.sha256(out).hexdigest() == http_target.big_sha256

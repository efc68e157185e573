"""HTTP on the SOCKS port, against the real OpenSSH sshd, with real curl and httpx:
absolute-form forwarding and CONNECT, Basic proxy auth, keep-alive, honest failure
statuses, destination rules, and the PAC file pytunnel serves itself.

Witnesses: the JSON events say which protocol pytunnel saw and which channels it opened;
sshd's DEBUG1 log (``server_request_direct_tcpip: ... target HOST port N``) says which
channels really reached the server.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import random
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fixtures.asyncssh_server import PORT_NEVER_ANSWER, AsyncsshServer
from fixtures.event_fence import fence, since, wait_since
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    Running,
    clean_env,
    recv_all,
    running_pytunnel,
    server_args,
)
from fixtures.sshd import SshdServer
from fixtures.targets import HttpTarget

pytestmark = pytest.mark.timeout(90)

CURL_TIMEOUT = 30.0
CLIENT_TIMEOUT = 10.0
LOG_TIMEOUT = 5.0
USER = "bob"
PASSWORD = "http-pr0xy-s3cret"
PAC_TYPE = "application/x-ns-proxy-autoconfig"
UPLOAD_SIZE = 2 * 1024 * 1024
UPLOAD = random.Random(2024).randbytes(UPLOAD_SIZE)
WRITE_EACH = "%{http_code} %{num_connects}\\n"


# ---- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_tunnel(sshd: SshdServer) -> Iterator[Running]:
    with running_pytunnel(["-D", "127.0.0.1:0", *server_args(sshd)]) as running:
        yield running


@pytest.fixture(scope="module")
def auth_tunnel(sshd: SshdServer) -> Iterator[Running]:
    args = ["-D", "127.0.0.1:0", "--proxy-auth", USER, *server_args(sshd)]
    with running_pytunnel(args, env={"PYTUNNEL_PROXY_PASSWORD": PASSWORD}) as running:
        yield running


@dataclass(frozen=True)
class Fetched:
    """One curl run: exit status, the ``-w`` lines, the headers (``-D``) and the body."""

    returncode: int
    written: list[str]
    headers: str
    body: bytes
    stderr: str

    @property
    def status(self) -> int:
        return int(self.written[0].split()[0])

    @property
    def connect_status(self) -> int:
        return int(self.written[0].split()[1])


def fetch(curl: str, tmp_path: Path, *args: str) -> Fetched:
    headers = tmp_path / "headers.txt"
    body = tmp_path / "body.bin"
    for path in (headers, body):
        path.unlink(missing_ok=True)
    result = subprocess.run(
        [
            curl,
            "--silent",
            "--show-error",
            "--max-time",
            str(CURL_TIMEOUT),
            "-D",
            str(headers),
            "-o",
            str(body),
            "-w",
            "%{http_code} %{http_connect} %{num_connects}\\n",
            *args,
        ],
        capture_output=True,
        timeout=CURL_TIMEOUT + 10,
        env=clean_env(),
        check=False,
    )
    return Fetched(
        result.returncode,
        result.stdout.decode().splitlines(),
        headers.read_text(errors="replace") if headers.exists() else "",
        body.read_bytes() if body.exists() else b"",
        result.stderr.decode(errors="replace"),
    )


def proxy_url(tunnel: Running) -> str:
    return f"http://{tunnel.netloc}"


def creds(password: str = PASSWORD) -> list[str]:
    return ["--proxy-user", f"{USER}:{password}"]


def curl_many(curl: str, *args: str) -> list[str]:
    """curl over several URLs (bodies dropped): ``%{http_code} %{num_connects}`` each."""
    drops = [arg for url in args if url.startswith("http") for arg in ("-o", "/dev/null")]
    result = subprocess.run(
        [curl, "-sS", "--max-time", str(CURL_TIMEOUT), *drops, "-w", WRITE_EACH, *args],
        capture_output=True,
        timeout=CURL_TIMEOUT + 10,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().split()


def target_line(host: str, port: int) -> str:
    return f"target {host} port {port}"


def raw_exchange(tunnel: Running, request: bytes, timeout: float = CLIENT_TIMEOUT) -> bytes:
    """Send ``request`` on a fresh connection and read until pytunnel closes it."""
    with socket.create_connection(tunnel.address, timeout=timeout) as sock:
        sock.sendall(request)
        return recv_all(sock, timeout)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- forwarding and CONNECT --------------------------------------------------------------


def test_absolute_form_big_download(
    curl: str, plain_tunnel: Running, http_target: HttpTarget, tmp_path: Path
) -> None:
    before = fence(plain_tunnel)
    got = fetch(curl, tmp_path, "-x", proxy_url(plain_tunnel), http_target.url("/big"))
    assert got.returncode == 0, got.stderr
    assert got.status == 200
    assert len(got.body) == http_target.big_size
    assert sha256(got.body) == http_target.big_sha256
    [parsed] = wait_since(plain_tunnel, before, "request_parsed")
    assert (parsed["protocol"], parsed["command"]) == ("http", "GET")
    assert (parsed["host"], parsed["port"]) == ("127.0.0.1", http_target.port)


def test_connect_big_download(
    curl: str, plain_tunnel: Running, http_target: HttpTarget, tmp_path: Path
) -> None:
    before = fence(plain_tunnel)
    got = fetch(curl, tmp_path, "-p", "-x", proxy_url(plain_tunnel), http_target.url("/big"))
    assert got.returncode == 0, got.stderr
    assert (got.status, got.connect_status) == (200, 200)
    assert "Connection established" in got.headers
    assert sha256(got.body) == http_target.big_sha256
    [parsed] = wait_since(plain_tunnel, before, "request_parsed")
    assert (parsed["protocol"], parsed["command"]) == ("http-connect", "CONNECT")
    assert (parsed["host"], parsed["port"]) == ("127.0.0.1", http_target.port)


@pytest.mark.parametrize("mode", ["absolute", "connect"])
def test_post_2mib_echo(
    curl: str, plain_tunnel: Running, http_target: HttpTarget, tmp_path: Path, mode: str
) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(UPLOAD)
    tunnel_flag = ["-p"] if mode == "connect" else []
    got = fetch(
        curl,
        tmp_path,
        *tunnel_flag,
        "-x",
        proxy_url(plain_tunnel),
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        f"@{upload}",
        f"http://localhost:{http_target.port}/echo",
    )
    assert got.returncode == 0, got.stderr
    assert got.status == 200
    assert len(got.body) == UPLOAD_SIZE
    assert got.body == UPLOAD


def test_httpx_through_the_http_proxy(plain_tunnel: Running, http_target: HttpTarget) -> None:
    before = fence(plain_tunnel)
    with httpx.Client(
        proxy=proxy_url(plain_tunnel), trust_env=False, timeout=CLIENT_TIMEOUT
    ) as client:
        response = client.get(http_target.url("/hello"))
    assert response.status_code == 200
    assert response.content == http_target.hello_body
    [parsed] = wait_since(plain_tunnel, before, "request_parsed")
    assert parsed["protocol"] == "http"


async def test_httpx_async_with_proxy_credentials(
    auth_tunnel: Running, http_target: HttpTarget
) -> None:
    proxy = f"http://{USER}:{PASSWORD}@{auth_tunnel.netloc}"
    async with httpx.AsyncClient(proxy=proxy, trust_env=False, timeout=CLIENT_TIMEOUT) as client:
        response = await client.get(http_target.url("/hello"))
    assert response.status_code == 200
    assert response.content == http_target.hello_body


# ---- keep-alive --------------------------------------------------------------------------


def test_keep_alive_same_host_reuses_connection_and_channel(
    curl: str, plain_tunnel: Running, sshd: SshdServer, http_target: HttpTarget
) -> None:
    before = fence(plain_tunnel)
    mark = sshd.log_mark()
    url = http_target.url("/hello")
    # One connection to the proxy for both requests, and both answered.
    assert curl_many(curl, "-x", proxy_url(plain_tunnel), url, url) == ["200", "1", "200", "0"]
    parsed = wait_since(plain_tunnel, before, "request_parsed", 2)
    assert parsed[0]["id"] == parsed[1]["id"]
    # The origin connection is kept too: one channel, one direct-tcpip at sshd.
    opened = since(plain_tunnel, before, "channel_opened")
    assert [ev["id"] for ev in opened] == [parsed[0]["id"]]
    assert sshd.wait_log(target_line("127.0.0.1", http_target.port), LOG_TIMEOUT, mark)
    assert sshd.log_text(mark).count(target_line("127.0.0.1", http_target.port)) == 1


def test_keep_alive_second_host_opens_a_second_channel(
    curl: str, plain_tunnel: Running, sshd: SshdServer, http_target: HttpTarget
) -> None:
    before = fence(plain_tunnel)
    mark = sshd.log_mark()
    first = http_target.url("/hello")
    second = f"http://localhost:{http_target.port}/hello"
    answers = curl_many(curl, "-x", proxy_url(plain_tunnel), first, second)
    assert answers == ["200", "1", "200", "0"]
    wait_since(plain_tunnel, before, "channel_opened", 2)
    opened = since(plain_tunnel, before, "channel_opened")
    assert [(ev["host"], ev["port"]) for ev in opened] == [
        ("127.0.0.1", http_target.port),
        ("localhost", http_target.port),
    ]
    assert opened[0]["id"] == opened[1]["id"]
    for host in ("127.0.0.1", "localhost"):
        assert sshd.wait_log(target_line(host, http_target.port), LOG_TIMEOUT, mark), host


# ---- failures ------------------------------------------------------------------------------


def test_refused_port_is_502_naming_the_reason(
    curl: str, plain_tunnel: Running, closed_port: int, tmp_path: Path
) -> None:
    before = fence(plain_tunnel)
    got = fetch(curl, tmp_path, "-x", proxy_url(plain_tunnel), f"http://127.0.0.1:{closed_port}/")
    assert got.status == 502
    assert got.body.decode().lower().startswith("connection refused")
    assert "text/plain" in got.headers
    [failed] = wait_since(plain_tunnel, before, "channel_failed")
    assert failed["reply"] == 5
    assert since(plain_tunnel, before, "channel_opened") == []


def test_refused_connect_is_502_never_200(plain_tunnel: Running, closed_port: int) -> None:
    request = (
        f"CONNECT 127.0.0.1:{closed_port} HTTP/1.1\r\nHost: 127.0.0.1:{closed_port}\r\n\r\n"
    ).encode()
    answer = raw_exchange(plain_tunnel, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502"), answer
    assert b"200" not in head
    assert b"connection refused" in body.lower()


def test_connect_through_curl_reports_502(
    curl: str, plain_tunnel: Running, closed_port: int, tmp_path: Path
) -> None:
    got = fetch(
        curl, tmp_path, "-p", "-x", proxy_url(plain_tunnel), f"http://127.0.0.1:{closed_port}/"
    )
    assert got.returncode != 0
    assert got.connect_status == 502


# Magic destination ports of the in-process asyncssh server (tests/fixtures/asyncssh_server).
MAGIC_STATUSES = [
    # (id, port, status, words of the body)
    ("never-answers", PORT_NEVER_ANSWER, 504, "timed out"),
    ("prohibited", 2, 403, "connection not allowed"),
    ("no-route", 5, 502, "host unreachable"),
    ("refused", 1, 502, "connection refused"),
]


@pytest.fixture(scope="module")
def magic_tunnel(asyncssh_server: AsyncsshServer) -> Iterator[Running]:
    args = ["-D", "127.0.0.1:0", "--open-timeout", "1", *server_args(asyncssh_server)]
    with running_pytunnel(args) as running:
        yield running


@pytest.mark.parametrize("method", ["CONNECT", "GET"])
@pytest.mark.parametrize(
    ("port", "status", "words"), [m[1:] for m in MAGIC_STATUSES], ids=[m[0] for m in MAGIC_STATUSES]
)
def test_failed_channel_status_is_the_only_answer(
    magic_tunnel: Running, method: str, port: int, status: int, words: str
) -> None:
    """CONNECT is answered only once the channel-open result is in: a channel that never
    opens gets 504 after --open-timeout, never an early 200."""
    target = f"127.0.0.1:{port}" if method == "CONNECT" else f"http://127.0.0.1:{port}/"
    request = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    answer = raw_exchange(magic_tunnel, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), answer
    assert answer.count(b"HTTP/1.1") == 1, answer
    assert body.decode().startswith(words), body


BAD_REQUESTS = [
    ("https-absolute", b"GET https://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"CONNECT"),
    ("connect-no-port", b"CONNECT localhost HTTP/1.1\r\nHost: localhost\r\n\r\n", b"host:port"),
    ("connect-bare-v6", b"CONNECT ::1:80 HTTP/1.1\r\nHost: x\r\n\r\n", b"brackets"),
]


@pytest.mark.parametrize(
    ("request_", "word"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_targets_get_400(plain_tunnel: Running, request_: bytes, word: bytes) -> None:
    answer = raw_exchange(plain_tunnel, request_)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert word in answer.partition(b"\r\n\r\n")[2]


def test_malformed_url_gets_400(plain_tunnel: Running) -> None:
    # Regression: the URL parser's own error escaped and the client got no answer.
    answer = raw_exchange(plain_tunnel, b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"bad URL" in answer


@pytest.mark.slow
def test_expect_100_continue_is_relayed(plain_tunnel: Running, http_target: HttpTarget) -> None:
    head = (
        f"POST {http_target.url('/echo')} HTTP/1.1\r\nHost: {http_target.netloc}\r\n"
        "Content-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(plain_tunnel.address, timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(head)
        # The origin answers 100 Continue as soon as it has the head; give it 2 s.
        sock.settimeout(2.0)
        try:
            interim = sock.recv(64)
        except TimeoutError:
            interim = b""
        # Whatever happened, finish the request so nothing is left hanging.
        sock.sendall(b"hello")
        rest = recv_all(sock, CLIENT_TIMEOUT)
    assert (interim + rest).endswith(b"hello"), rest
    assert interim.startswith(b"HTTP/1.1 100"), interim


# ---- proxy authentication --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["absolute", "connect"])
def test_right_credentials(
    curl: str, auth_tunnel: Running, http_target: HttpTarget, tmp_path: Path, mode: str
) -> None:
    tunnel_flag = ["-p"] if mode == "connect" else []
    got = fetch(
        curl,
        tmp_path,
        *tunnel_flag,
        "-x",
        proxy_url(auth_tunnel),
        *creds(),
        http_target.url("/hello"),
    )
    assert got.returncode == 0, got.stderr
    assert got.status == 200
    assert got.body == http_target.hello_body


@pytest.mark.parametrize("mode", ["absolute", "connect"])
@pytest.mark.parametrize("given", ["wrong-password", "wrong-user", "none"])
def test_missing_or_wrong_credentials_get_407(
    curl: str,
    auth_tunnel: Running,
    sshd: SshdServer,
    http_target: HttpTarget,
    tmp_path: Path,
    mode: str,
    given: str,
) -> None:
    before = fence(auth_tunnel)
    mark = sshd.log_mark()
    credentials = {
        "wrong-password": creds("not-the-password"),
        "wrong-user": ["--proxy-user", f"alice:{PASSWORD}"],
        "none": [],
    }[given]
    tunnel_flag = ["-p"] if mode == "connect" else []
    url = f"http://localhost:{http_target.port}/hello"
    got = fetch(curl, tmp_path, *tunnel_flag, "-x", proxy_url(auth_tunnel), *credentials, url)
    status = got.connect_status if mode == "connect" else got.status
    assert status == 407, got
    challenge = [
        line for line in got.headers.splitlines() if line.lower().startswith("proxy-authenticate:")
    ]
    assert challenge == ['Proxy-Authenticate: Basic realm="pytunnel"'], got.headers
    if mode == "absolute":
        assert got.body != http_target.hello_body
    [rejected] = wait_since(auth_tunnel, before, "client_rejected", auth=True)
    assert "HTTP" in rejected["reason"]
    assert since(auth_tunnel, before, "channel_opened") == []
    assert target_line("localhost", http_target.port) not in sshd.log_text(mark)


def test_credentials_never_reach_the_origin(auth_tunnel: Running) -> None:
    """What the origin sees: origin form, Host, end-to-end headers; never the proxy
    credentials nor any hop-by-hop header."""
    seen: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(CLIENT_TIMEOUT)
        port = server.getsockname()[1]

        def serve_one() -> None:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(CLIENT_TIMEOUT)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                seen.append(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request = (
            f"GET http://127.0.0.1:{port}/path?q=1 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            f"Proxy-Authorization: Basic {token}\r\n"
            "Proxy-Connection: keep-alive\r\n"
            "Connection: close, X-Hop\r\n"
            "X-Hop: drop me\r\n"
            "Keep-Alive: timeout=5\r\n"
            "X-Kept: keep me\r\n\r\n"
        ).encode()
        answer = raw_exchange(auth_tunnel, request)
        thread.join(CLIENT_TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.endswith(b"ok")
    [head] = seen
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /path?q=1 HTTP/1.1"
    names = {line.split(":", 1)[0].lower() for line in lines[1:] if line}
    assert f"host: 127.0.0.1:{port}" in (line.lower() for line in lines)
    assert "x-kept" in names
    for hop in ("proxy-authorization", "proxy-connection", "x-hop", "keep-alive"):
        assert hop not in names, head
    assert token.encode() not in head
    assert PASSWORD.encode() not in head


@dataclass(frozen=True)
class Logged:
    """A tunnel run with -vv and -E: every place a rejection reason gets written."""

    tunnel: Running
    log_file: Path

    def everything(self) -> dict[str, str]:
        return {
            "stdout": self.tunnel.stdout_text(),
            "stderr": self.tunnel.stderr_text(),
            "log file": self.log_file.read_text(errors="replace"),
        }


@pytest.fixture(scope="module")
def logged_auth_tunnel(
    sshd: SshdServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Logged]:
    log_file = tmp_path_factory.mktemp("logged-auth") / "pytunnel.log"
    args = [
        "-vv",
        "-E",
        str(log_file),
        "-D",
        "127.0.0.1:0",
        "--proxy-auth",
        USER,
        *server_args(sshd),
    ]
    with running_pytunnel(args, env={"PYTUNNEL_PROXY_PASSWORD": PASSWORD}) as running:
        yield Logged(running, log_file)


# Header lines h11 refuses, each carrying the credentials: no colon, a space before the
# colon, a NUL in the value.
MALFORMED_AUTH_LINES = {
    "no-colon": "Proxy-Authorization Basic {token}",
    "space-before-colon": "Proxy-Authorization : Basic {token}",
    "nul-in-value": "Proxy-Authorization: Basic {token}\x00",
}


@pytest.mark.parametrize("line", MALFORMED_AUTH_LINES.values(), ids=MALFORMED_AUTH_LINES.keys())
def test_malformed_header_line_is_never_logged(
    logged_auth_tunnel: Logged, http_target: HttpTarget, line: str
) -> None:
    """A broken Proxy-Authorization line gets 400 and a reason that names what was wrong,
    never the base64 credentials: not in the JSON event, on stderr, in the -E file, nor
    echoed in the answer."""
    tunnel = logged_auth_tunnel.tunnel
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    before = fence(tunnel)
    request = (
        f"GET http://127.0.0.1:{http_target.port}/hello HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{http_target.port}\r\n"
        f"{line.format(token=token)}\r\n\r\n"
    ).encode()
    answer = raw_exchange(tunnel, request)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    [rejected] = wait_since(tunnel, before, "client_rejected")
    assert rejected["reason"] == "HTTP protocol error: malformed header line"
    assert token.encode() not in answer
    fence(tunnel)
    written = logged_auth_tunnel.everything()
    assert "malformed header line" in written["log file"]
    for where, text in written.items():
        assert token not in text, where
        assert PASSWORD not in text, where


# ---- bounds on what a client may hold ---------------------------------------------------

STALL_TIMEOUT = 30.0  # how long a test waits for pytunnel to act on a 1 s deadline


class OneConnectionOrigin:
    """An origin on loopback that takes one connection, keeps what arrives, and notes
    when the other side (sshd, for pytunnel's channel) closes it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(STALL_TIMEOUT)
        self.port = self.server.getsockname()[1]
        self.received = b""
        self.accepted = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        self.accepted.set()
        with conn:
            conn.settimeout(STALL_TIMEOUT)
            try:
                while chunk := conn.recv(65536):
                    self.received += chunk
            except OSError:
                return
            self.closed.set()

    def close(self) -> None:
        # On Linux, shutdown wakes an accept() still waiting in the thread; close does not.
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(STALL_TIMEOUT)


@pytest.fixture
def origin() -> Iterator[OneConnectionOrigin]:
    served = OneConnectionOrigin()
    try:
        yield served
    finally:
        served.close()


@pytest.fixture
def quick_tunnel(pytunnel_factory: PytunnelFactory, sshd: SshdServer) -> Running:
    return pytunnel_factory(["--handshake-timeout", "1", "-D", "127.0.0.1:0", *server_args(sshd)])


def test_stalled_request_body_gets_408_and_the_channel_closes(
    quick_tunnel: Running, origin: OneConnectionOrigin
) -> None:
    """Content-Length 1000, ten bytes, then silence: once the idle bound passes the
    client gets 408 and a close, and the channel to the origin is closed too."""
    before = fence(quick_tunnel)
    head = (
        f"POST http://127.0.0.1:{origin.port}/upload HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{origin.port}\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    with socket.create_connection(quick_tunnel.address, timeout=STALL_TIMEOUT) as sock:
        sock.sendall(head + b"0123456789")
        answer = recv_all(sock, STALL_TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert origin.closed.wait(STALL_TIMEOUT), "the channel to the origin stayed open"
    assert origin.received.endswith(b"0123456789")
    [rejected] = wait_since(quick_tunnel, before, "client_rejected")
    assert rejected["reason"] == "request body stalled for 1 s"


MAX_HEAD = 64 * 1024


def head_of(size: int, host: str, port: int) -> bytes:
    """A GET whose request line and headers take exactly ``size`` bytes, the empty line
    included, padded with 8 KiB headers (each under any per-line limit)."""
    start = f"GET http://{host}:{port}/hello HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
    pad = size - len(start) - 2
    lines = []
    index = 0
    while pad > 0:
        name = f"X-Pad-{index}: ".encode()
        take = min(8192, pad) - len(name) - 2
        assert take > 0, "size leaves too little for one more header"
        lines.append(name + b"a" * take + b"\r\n")
        pad -= len(lines[-1])
        index += 1
    head = start + b"".join(lines) + b"\r\n"
    assert len(head) == size
    return head


@pytest.mark.parametrize("writes", ["one-write", "1-KiB-writes"])
def test_oversized_head_gets_431_and_nothing_reaches_upstream(
    plain_tunnel: Running, sshd: SshdServer, origin: OneConnectionOrigin, writes: str
) -> None:
    """100 KB of request line and headers, sent at once or in pieces: 431, and no
    channel is opened, so not a byte of it reaches sshd or the origin."""
    before = fence(plain_tunnel)
    mark = sshd.log_mark()
    head = head_of(100_000, "127.0.0.1", origin.port)
    step = len(head) if writes == "one-write" else 1024
    with socket.create_connection(plain_tunnel.address, timeout=CLIENT_TIMEOUT) as sock:
        for start in range(0, len(head), step):
            sock.sendall(head[start : start + step])
        answer = recv_all(sock, CLIENT_TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    [rejected] = wait_since(plain_tunnel, before, "client_rejected")
    assert rejected["reason"] == "HTTP protocol error: header section too large"
    assert since(plain_tunnel, before, "request_parsed") == []
    assert since(plain_tunnel, before, "channel_opened") == []
    assert target_line("127.0.0.1", origin.port) not in sshd.log_text(mark)
    assert not origin.accepted.is_set()


def test_head_at_the_limit_is_forwarded(plain_tunnel: Running, http_target: HttpTarget) -> None:
    """Exactly 64 KiB of head is served, whether it comes at once or not; h11's own
    default (16 KiB) is not the limit."""
    request = head_of(MAX_HEAD - len(b"Connection: close\r\n"), "127.0.0.1", http_target.port)
    request = request[:-2] + b"Connection: close\r\n\r\n"
    assert len(request) == MAX_HEAD
    answer = raw_exchange(plain_tunnel, request)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert answer.endswith(http_target.hello_body)


# ---- destination rules -------------------------------------------------------------------


@pytest.fixture
def deny_tunnel(
    pytunnel_factory: PytunnelFactory, sshd: SshdServer, http_target: HttpTarget
) -> Running:
    return pytunnel_factory(
        ["-D", "127.0.0.1:0", "--deny", f"127.0.0.1:{http_target.port}", *server_args(sshd)]
    )


def assert_never_reached_sshd(
    sshd: SshdServer, mark: int, tunnel: Running, http_target: HttpTarget, *hosts: str
) -> None:
    """sshd logs asynchronously; a later allowed request showing up in its log proves
    that an earlier one would have shown up too."""
    sentinel = f"http://localhost:{http_target.port}/hello"
    with httpx.Client(proxy=proxy_url(tunnel), trust_env=False, timeout=CLIENT_TIMEOUT) as client:
        assert client.get(sentinel).status_code == 200
    assert sshd.wait_log(target_line("localhost", http_target.port), LOG_TIMEOUT, mark)
    log = sshd.log_text(mark)
    for host in hosts:
        assert target_line(host, http_target.port) not in log, host


@pytest.mark.parametrize("mode", ["absolute", "connect"])
def test_denied_destination_is_403_and_never_reaches_sshd(
    curl: str,
    deny_tunnel: Running,
    sshd: SshdServer,
    http_target: HttpTarget,
    tmp_path: Path,
    mode: str,
) -> None:
    mark = sshd.log_mark()
    before = fence(deny_tunnel)
    tunnel_flag = ["-p"] if mode == "connect" else []
    got = fetch(curl, tmp_path, *tunnel_flag, "-x", proxy_url(deny_tunnel), http_target.url())
    if mode == "connect":
        assert got.connect_status == 403
    else:
        assert got.status == 403
        assert f"--deny 127.0.0.1:{http_target.port}" in got.body.decode()
    [failed] = wait_since(deny_tunnel, before, "channel_failed")
    assert failed["reply"] == 2
    assert_never_reached_sshd(sshd, mark, deny_tunnel, http_target, "127.0.0.1")


def test_deny_rule_holds_for_the_ipv4_mapped_form(
    deny_tunnel: Running, sshd: SshdServer, http_target: HttpTarget
) -> None:
    # Regression: the IPv6 spelling of the denied address used to slip through.
    mark = sshd.log_mark()
    # By hand: httpx 0.28 drops the brackets from an IPv6 host in absolute form.
    netloc = f"[::ffff:127.0.0.1]:{http_target.port}"
    head = f"GET http://{netloc}/hello HTTP/1.1\r\nHost: {netloc}\r\n"
    request = (head + "Connection: close\r\n\r\n").encode()
    answer = raw_exchange(deny_tunnel, request)
    assert_never_reached_sshd(sshd, mark, deny_tunnel, http_target, "::ffff:127.0.0.1")
    assert answer.startswith(b"HTTP/1.1 403"), answer


# ---- the PAC file and other local paths ----------------------------------------------------


@pytest.mark.parametrize("path", ["/proxy.pac", "/wpad.dat"])
def test_pac_file(curl: str, plain_tunnel: Running, tmp_path: Path, path: str) -> None:
    before = fence(plain_tunnel)
    got = fetch(curl, tmp_path, f"http://{plain_tunnel.netloc}{path}")
    assert got.returncode == 0, got.stderr
    assert got.status == 200
    assert f"content-type: {PAC_TYPE}" in got.headers.lower()
    text = got.body.decode()
    assert "function FindProxyForURL(url, host)" in text
    assert f"SOCKS5 127.0.0.1:{plain_tunnel.port}" in text
    # Served by pytunnel itself: no request for the tunnel, no channel.
    assert since(plain_tunnel, before, "request_parsed") == []


def test_pac_file_needs_no_credentials(curl: str, auth_tunnel: Running, tmp_path: Path) -> None:
    got = fetch(curl, tmp_path, f"http://{auth_tunnel.netloc}/proxy.pac")
    assert got.status == 200
    # Browsers cannot log in to a SOCKS5 proxy, but do HTTP proxy Basic auth.
    assert f'"PROXY 127.0.0.1:{auth_tunnel.port}"' in got.body.decode()


def test_pac_file_keeps_the_connection(curl: str, plain_tunnel: Running) -> None:
    base = f"http://{plain_tunnel.netloc}"
    answers = curl_many(curl, f"{base}/proxy.pac", f"{base}/wpad.dat")
    assert answers == ["200", "1", "200", "0"]


def test_other_local_path_is_404(curl: str, plain_tunnel: Running, tmp_path: Path) -> None:
    got = fetch(curl, tmp_path, f"http://{plain_tunnel.netloc}/nope")
    assert got.status == 404
    assert "/proxy.pac" in got.body.decode()

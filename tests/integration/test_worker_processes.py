"""``--workers N``: N processes serving the same ``-D`` ports, each logged in on its own.

The real console script against the real OpenSSH sshd (and the in-process asyncssh server
for a login only a person can finish). Covered: the workers come up with SSH logins of
their own and serve (and the plain lines name them); their connection records carry
``worker`` and exact byte counts, with ids from the tunnel's one counter;
``--max-connections`` is shared among the processes, the remainder to the first; a killed
worker is reported, its open connection closed with the counts last heard, and it is
started again; a worker whose session drops stops accepting until it is back; SIGTERM and
SIGINT stop the workers (each ends its session itself) and wait for them, a worker drains
like the first process, the end of ``-- COMMAND`` stops them (the command runs once), and
SIGKILL of the first process leaves none behind; a worker that could only log in with a
password fails for good while the tunnel serves on; SIGHUP reconnects every worker;
``--workers`` above ``--max-connections`` is a usage error.

Which process accepts a client is the kernel's choice, so nothing here assumes a split: to
have a worker serve, the first process is stopped (SIGSTOP: only the workers accept on the
shared socket), and to have the first process serve, the workers are. Every stopped process
is continued in a ``finally``; every wait has a deadline; processes are stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fixtures.asyncssh_server import ALICE, AsyncsshServer
from fixtures.net import wait_until
from fixtures.pytunnel_proc import (
    PytunnelFactory,
    Running,
    client_name,
    connect_proxy,
    error_lines,
    recv_all,
    recv_exact,
    run_pytunnel,
    server_args,
    socks5_greeting,
    socks5_open,
    socks5_request,
)
from fixtures.replies import SOCKS5_OK, socks5_failure
from fixtures.sshd import SshdServer
from fixtures.targets import EchoTarget

pytestmark = pytest.mark.timeout(120)

DEADLINE = 30.0
# sshd logs one of these per authenticated connection.
ACCEPTED = "Accepted publickey"
# ... and one of these per client that ended its connection itself (not killed).
DISCONNECTED = "Disconnected by application"


# -- processes ------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """Running or stopped; a zombie holds no sockets and counts as gone."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def worker_pids(parent: int) -> list[int]:
    """The live ``python -m tunnel.worker`` children of ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or int(fields[1]) != parent or not pid_alive(int(entry)):
            continue
        with contextlib.suppress(OSError):
            if b"tunnel.worker" in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return sorted(found)


def kill_leftovers(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def stopped(*pids: int) -> Iterator[None]:
    """SIGSTOP ``pids`` and wait until the kernel shows each one stopped (a signal is
    delivered asynchronously: until then it could still accept); SIGCONT in any case."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for pid in pids:
            assert wait_until(lambda pid=pid: (_stat_fields(pid) or ["?"])[0] == "T", DEADLINE)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _socket_inodes(pid: int) -> set[int]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    found.add(int(link[len("socket:[") : -1]))
    return found


def _tcp_ports() -> dict[int, tuple[int, int]]:
    """Socket inode -> (local port, remote port), for every TCP socket on the machine."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
                table[int(fields[9])] = (local, remote)
    return table


def tcp_ports_of(pid: int) -> set[tuple[int, int]]:
    """(local port, remote port) of the TCP sockets ``pid`` holds; remote 0: listening."""
    table = _tcp_ports()
    return {table[inode] for inode in _socket_inodes(pid) if inode in table}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        frontier = [kid for parent in frontier for kid in children.get(parent, [])]
        found.extend(frontier)
    return found


def sshd_side_of(server: SshdServer, pid: int) -> list[int]:
    """The sshd processes that hold ``pid``'s SSH connection to ``server``."""
    assert server.pid is not None
    [port] = [local for local, remote in tcp_ports_of(pid) if remote == server.port]
    held = [p for p in _descendants(server.pid) if (server.port, port) in tcp_ports_of(p)]
    assert held, (port, _descendants(server.pid))
    return held


# -- the tunnel ---------------------------------------------------------------------------


def wait_workers_up(tunnel: Running, count: int) -> dict[int, int]:
    """Worker number -> pid, once ``count`` workers said ``up`` (each its first time)."""
    ups = tunnel.wait_events("worker_state", count, timeout=DEADLINE, state="up")
    numbers = {event["worker"]: event["pid"] for event in ups}
    assert sorted(numbers) == list(range(1, count + 1)), tunnel.describe()
    return numbers


def echo_through(tunnel: Running, port: int, data: bytes) -> str:
    """One tunnelled connection to the echo target that uploads ``data`` and checks the
    digest that comes back; returns its client name."""
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", port)
    with sock:
        assert reply == SOCKS5_OK
        name = client_name(sock)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(data)
    return name


def open_held(tunnel: Running, port: int, data: bytes) -> tuple[socket.socket, str]:
    """A tunnelled connection left open (the echo target answers only at our EOF)."""
    sock, reply = socks5_open(tunnel.address, "127.0.0.1", port)
    try:
        assert reply == SOCKS5_OK
        sock.sendall(data)
    except BaseException:
        sock.close()
        raise
    return sock, client_name(sock)


def finish_held(sock: socket.socket, data: bytes) -> None:
    with sock:
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == EchoTarget.expected_reply(data)


def records_of(tunnel: Running, name: str, client: str) -> list[dict[str, object]]:
    return tunnel.events(name, client=client)


def start_workers(
    pytunnel_factory: PytunnelFactory, server: SshdServer, workers: int, *extra: str
) -> tuple[Running, dict[int, int]]:
    tunnel = pytunnel_factory(
        ["--workers", str(workers), *extra, "-D", "127.0.0.1:0", *server_args(server)]
    )
    return tunnel, wait_workers_up(tunnel, workers - 1)


# -- coming up and serving -------------------------------------------------------------------


def test_three_processes_log_in_on_their_own_and_all_serve(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:
    server = make_sshd()
    mark = server.log_mark()
    tunnel, ups = start_workers(pytunnel_factory, server, 3)
    # Two workers, two processes of their own, children of the first, alive.
    assert len(set(ups.values())) == 2
    assert tunnel.pid not in ups.values()
    assert sorted(ups.values()) == worker_pids(tunnel.pid), tunnel.describe()
    # Three SSH logins, three connections the server holds.
    assert wait_until(lambda: server.log_text(mark).count(ACCEPTED) >= 3, DEADLINE)
    assert wait_until(lambda: len(server.children()) == 3, DEADLINE), server.children()
    assert server.log_text(mark).count(ACCEPTED) == 3, server.log_text(mark)

    rng = random.Random(7)
    payloads = [rng.randbytes(rng.randrange(1, 200_000)) for _ in range(30)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        names = list(pool.map(lambda data: echo_through(tunnel, echo_target.port, data), payloads))
    closed = tunnel.wait_events("connection_closed", len(payloads), timeout=DEADLINE)
    by_client = {event["client"]: event for event in closed}
    assert set(names) <= set(by_client), tunnel.describe()
    for name, data in zip(names, payloads, strict=True):
        record = by_client[name]
        assert (record["bytes_up"], record["bytes_down"]) == (
            len(data),
            len(EchoTarget.expected_reply(data)),
        ), record
        assert record.get("worker", 0) in (0, 1, 2), record
    # One id per connection, across the three processes.
    accepted = tunnel.events("client_accepted")
    assert len(accepted) == len(payloads)
    assert len({event["id"] for event in accepted}) == len(payloads), accepted
    assert {event["client"]: event["id"] for event in accepted} == {
        name: by_client[name]["id"] for name in names
    }
    assert len(tunnel.events("ready")) == 1
    # No worker went down meanwhile.
    assert [e["state"] for e in tunnel.events("worker_state")] == ["up", "up"]


def test_plain_lines_name_each_worker_and_its_pid(
    sshd: SshdServer, pytunnel_factory: PytunnelFactory
) -> None:
    tunnel = pytunnel_factory(
        ["--workers", "2", "-D", "127.0.0.1:0", *server_args(sshd)],
        json_out=False,
        wait_ready=False,
    )
    assert wait_until(lambda: len(worker_pids(tunnel.pid)) == 1, DEADLINE)
    [pid] = worker_pids(tunnel.pid)
    assert tunnel.wait_stderr(f"worker 1 (pid {pid}) up", DEADLINE), tunnel.describe()


def test_worker_records_carry_the_worker_and_exact_counts_and_ids_never_collide(
    sshd: SshdServer, pytunnel_factory: PytunnelFactory, echo_target: EchoTarget
) -> None:
    tunnel, ups = start_workers(pytunnel_factory, sshd, 3)
    rng = random.Random(11)
    # Served by the first process: the workers are stopped, only it accepts.
    first_payloads = [rng.randbytes(size) for size in (10, 70_000, 333)]
    with stopped(*ups.values()):
        first_names = [echo_through(tunnel, echo_target.port, data) for data in first_payloads]
    # Served by the workers: the first process is stopped. What the workers say
    # meanwhile waits in their pipes.
    worker_payloads = [rng.randbytes(size) for size in (1, 4096, 150_001, 77)]
    with stopped(tunnel.pid):
        worker_names = [echo_through(tunnel, echo_target.port, data) for data in worker_payloads]

    ids: list[int] = []
    for names, payloads, by_worker in (
        (first_names, first_payloads, False),
        (worker_names, worker_payloads, True),
    ):
        for name, data in zip(names, payloads, strict=True):
            closed = tunnel.wait_event("connection_closed", timeout=DEADLINE, client=name)
            [opened] = records_of(tunnel, "channel_opened", name)
            [accepted] = records_of(tunnel, "client_accepted", name)
            assert opened["id"] == closed["id"] == accepted["id"], tunnel.describe()
            assert (closed["bytes_up"], closed["bytes_down"]) == (
                len(data),
                len(EchoTarget.expected_reply(data)),
            ), closed
            if by_worker:
                assert closed["worker"] in ups, closed
                assert opened["worker"] == accepted["worker"] == closed["worker"]
            else:
                for record in (accepted, opened, closed):
                    assert "worker" not in record, record
            ids.append(int(closed["id"]))
    assert len(set(ids)) == len(ids), ids
    assert len({event["id"] for event in tunnel.events("client_accepted")}) == len(ids)


@pytest.mark.parametrize(
    ("limit", "workers", "shares"),
    [(2, 2, (1, 1)), (7, 3, (3, 2, 2))],  # the remainder goes to the first process
)
def test_max_connections_is_shared_among_the_processes(
    sshd: SshdServer,
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
    limit: int,
    workers: int,
    shares: tuple[int, ...],
) -> None:
    tunnel, ups = start_workers(pytunnel_factory, sshd, workers, "--max-connections", str(limit))
    processes = {0: tunnel.pid, **ups}
    for serving, share in enumerate(shares):
        # Only the process under test accepts: the others are stopped.
        with stopped(*(pid for number, pid in processes.items() if number != serving)):
            held = [open_held(tunnel, echo_target.port, b"held") for _ in range(share)]
            try:
                over, reply = socks5_open(tunnel.address, "127.0.0.1", echo_target.port)
                with over:
                    assert reply == socks5_failure(0x01)
                    assert recv_all(over) == b""
                    over_name = client_name(over)
            finally:
                for sock, _ in held:
                    finish_held(sock, b"held")
        failed = tunnel.wait_event("channel_failed", timeout=DEADLINE, client=over_name)
        assert failed["reply"] == 0x01
        assert f"too many connections (limit {share})" in failed["reason"], failed
        assert failed.get("worker", 0) == serving, failed
        for _, name in held:
            closed = tunnel.wait_event("connection_closed", timeout=DEADLINE, client=name)
            assert closed.get("worker", 0) == serving, closed


# -- a worker ends ----------------------------------------------------------------------------


def wait_counts(tunnel: Running, bytes_up: int, bytes_down: int) -> None:
    """Ask for status lines (SIGUSR1) until the totals, open connections included, are
    these: a worker's counts have reached the first process."""
    asked = len(tunnel.events("status"))

    def reached() -> bool:
        nonlocal asked
        asked += 1
        tunnel.send_signal(signal.SIGUSR1)
        status = tunnel.wait_events("status", asked, timeout=DEADLINE)[-1]
        return (status["bytes_up"], status["bytes_down"]) == (bytes_up, bytes_down)

    assert wait_until(reached, DEADLINE, interval=0.2), tunnel.describe()


def test_a_killed_worker_is_reported_its_connection_closed_and_it_starts_again(
    sshd: SshdServer, pytunnel_factory: PytunnelFactory, echo_target: EchoTarget
) -> None:
    tunnel, ups = start_workers(pytunnel_factory, sshd, 2)
    [old] = ups.values()
    sent = b"x" * 5000
    with stopped(tunnel.pid):
        held, held_name = open_held(tunnel, echo_target.port, b"")
    with held:
        opened = tunnel.wait_event("channel_opened", timeout=DEADLINE, client=held_name)
        assert opened["worker"] == 1
        # Sent only now: no event of the worker's carries these bytes, its counts of its
        # open connections (every 0.5 s) do.
        held.sendall(sent)
        wait_counts(tunnel, len(sent), 0)
        os.kill(old, signal.SIGKILL)
        exited = tunnel.wait_event("worker_state", timeout=DEADLINE, state="exited")
        assert (exited["worker"], exited["pid"]) == (1, old)
        assert "killed by SIGKILL" in exited["reason"], exited
        assert "starting again in" in exited["reason"], exited
        # Its open connection is reported closed, by its id, with the counts last heard.
        closed = tunnel.wait_event("connection_closed", timeout=DEADLINE, client=held_name)
        assert (closed["id"], closed["worker"]) == (opened["id"], 1)
        assert (closed["bytes_up"], closed["bytes_down"]) == (len(sent), 0), closed
        assert recv_all(held) == b""  # the worker's end of it went with the process
    # Served meanwhile (by the first process, unless the new worker is up already).
    echo_through(tunnel, echo_target.port, b"while the worker is away")
    # Started again: a new process, up with its own session.
    again = tunnel.wait_events("worker_state", 2, timeout=DEADLINE, state="up")[1]
    assert again["worker"] == 1
    assert again["pid"] != old
    assert worker_pids(tunnel.pid) == [again["pid"]]
    assert not pid_alive(old)
    states = [(e["state"], e["pid"]) for e in tunnel.events("worker_state")]
    assert states == [("up", old), ("exited", old), ("up", again["pid"])], states
    # And it serves.
    with stopped(tunnel.pid):
        name = echo_through(tunnel, echo_target.port, b"from the new worker")
    assert tunnel.wait_event("connection_closed", timeout=DEADLINE, client=name)["worker"] == 1


def test_a_worker_whose_events_wait_takes_no_new_client_and_keeps_its_own_flowing(
    sshd: SshdServer, pytunnel_factory: PytunnelFactory, echo_target: EchoTarget
) -> None:
    """The first process stopped (Ctrl-Z on it, say) reads nothing from the worker: past
    its backlog of events the worker accepts no new client, and what it has open keeps
    flowing, since writing its events never blocks it. Once the first process reads
    again, the client that waited is served and every event arrives."""
    tunnel, _ = start_workers(pytunnel_factory, sshd, 2)
    data = b"through a worker whose events wait" * 100
    waiting: socket.socket | None = None
    try:
        with stopped(tunnel.pid):
            held, held_name = open_held(tunnel, echo_target.port, b"")
            with held:
                # Clients that greet and leave, until one gets no answer (each costs the
                # worker two events in its backlog). A slow answer on a busy machine ends
                # the loop early too, which the rest of the test does not mind.
                for _ in range(20_000):
                    sock = connect_proxy(tunnel.address, DEADLINE)
                    sock.sendall(socks5_greeting())
                    sock.settimeout(2.0)
                    try:
                        answer = sock.recv(2)
                    except TimeoutError:
                        waiting = sock
                        break
                    sock.close()
                    assert answer == b"\x05\x00"
                assert waiting is not None, "the worker never stopped accepting"
                # Its open connection still goes both ways.
                held.settimeout(DEADLINE)
                held.sendall(data)
                held.shutdown(socket.SHUT_WR)
                assert recv_all(held) == EchoTarget.expected_reply(data)
        # The first process reads again: the client that waited is served.
        waiting.settimeout(DEADLINE)
        assert recv_exact(waiting, 2, DEADLINE) == b"\x05\x00"
        waiting.sendall(socks5_request("127.0.0.1", echo_target.port))
        assert recv_exact(waiting, 10, DEADLINE) == SOCKS5_OK
        closed = tunnel.wait_event("connection_closed", timeout=DEADLINE, client=held_name)
        assert closed["worker"] == 1
        assert closed["bytes_up"] == len(data), closed
    finally:
        if waiting is not None:
            waiting.close()


def test_a_worker_whose_session_drops_leaves_the_port_to_the_others_until_it_is_back(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:
    server = make_sshd()
    tunnel, ups = start_workers(pytunnel_factory, server, 2)
    [pid] = ups.values()
    its_sshd = sshd_side_of(server, pid)
    assert server.pid is not None
    # The listener stopped: the worker's next login waits in its backlog meanwhile.
    with stopped(server.pid):
        for sshd_pid in its_sshd:
            os.kill(sshd_pid, signal.SIGKILL)
        lost = tunnel.wait_event("worker_state", timeout=DEADLINE, state="lost")
        assert (lost["worker"], lost["pid"]) == (1, pid), lost
        # With the first process stopped too, nobody takes a new client...
        with stopped(tunnel.pid):
            sock = connect_proxy(tunnel.address)
            sock.sendall(socks5_greeting())
            with pytest.raises(AssertionError, match="timed out"):
                recv_exact(sock, 2, timeout=1.0)
        # ...until the first process is back: it serves the client on its own session.
        with sock:
            assert recv_exact(sock, 2) == b"\x05\x00"
            sock.sendall(socks5_request("127.0.0.1", echo_target.port))
            assert recv_exact(sock, 10) == SOCKS5_OK
            name = client_name(sock)
            sock.sendall(b"while the worker is away")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == EchoTarget.expected_reply(b"while the worker is away")
        assert "worker" not in tunnel.wait_event("connection_closed", client=name)
    # The same process logs in again and takes clients again.
    back = tunnel.wait_events("worker_state", 2, timeout=DEADLINE, state="up")[1]
    assert (back["worker"], back["pid"]) == (1, pid), back
    assert [e["state"] for e in tunnel.events("worker_state")] == ["up", "lost", "up"]
    with stopped(tunnel.pid):
        name = echo_through(tunnel, echo_target.port, b"back")
    assert tunnel.wait_event("connection_closed", timeout=DEADLINE, client=name)["worker"] == 1


# -- the first process ends ---------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_stop_signal_stops_the_workers_and_waits_for_them(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
    signum: int,
    status: int,
) -> None:
    server = make_sshd()
    tunnel, ups = start_workers(pytunnel_factory, server, 3)
    pids = list(ups.values())
    try:
        echo_through(tunnel, echo_target.port, b"before the end")
        mark = server.log_mark()
        assert tunnel.stop(signum, timeout=DEADLINE) == status, tunnel.describe()
        # It waited for them: they are gone (and reaped) once it is.
        assert [pid for pid in pids if pid_alive(pid)] == [], tunnel.describe()
        # Each of the three ended its SSH session itself, none was killed.
        assert wait_until(lambda: not server.children(), DEADLINE), server.children()
        log = server.log_text(mark)
        assert log.count(DISCONNECTED) == 3, log
        assert "Connection closed by" not in log, log
        # Stopped on purpose: none of them "exited" to be started again.
        assert all(e["state"] == "up" for e in tunnel.events("worker_state")), tunnel.describe()
    finally:
        kill_leftovers(pids)


def test_a_worker_drains_its_connections_like_the_first_process(
    sshd: SshdServer, pytunnel_factory: PytunnelFactory, echo_target: EchoTarget
) -> None:
    tunnel, ups = start_workers(pytunnel_factory, sshd, 2, "--drain", "30")
    [pid] = ups.values()
    listening = {(tunnel.port, 0)}
    assert listening <= tcp_ports_of(pid)
    try:
        with stopped(tunnel.pid):
            held, held_name = open_held(tunnel, echo_target.port, b"before the signal, ")
        try:
            assert tunnel.wait_event("channel_opened", client=held_name)["worker"] == 1
            tunnel.send_signal(signal.SIGTERM)
            # The worker got it: it no longer holds the listening socket, it drains.
            assert wait_until(lambda: not listening & tcp_ports_of(pid), DEADLINE)
            assert pid_alive(pid)
            held.sendall(b"after it")
        except BaseException:
            held.close()
            raise
        finish_held(held, b"before the signal, after it")
        assert tunnel.wait(DEADLINE) == 0, tunnel.describe()
        closed = tunnel.wait_event("connection_closed", client=held_name)
        assert (closed["worker"], closed["bytes_up"]) == (1, len(b"before the signal, after it"))
        assert wait_until(lambda: not pid_alive(pid), DEADLINE)
    finally:
        kill_leftovers([pid])


def test_the_command_runs_once_and_its_end_stops_the_workers(
    make_sshd: Callable[..., SshdServer], pytunnel_factory: PytunnelFactory, tmp_path: Path
) -> None:
    server = make_sshd()
    ran, go = tmp_path / "ran", tmp_path / "go"
    script = f"echo $$ >> {ran}; while [ ! -e {go} ]; do sleep 0.05; done"
    tunnel = pytunnel_factory(
        ["--workers", "3", "-D", "127.0.0.1:0", *server_args(server), "--", "sh", "-c", script]
    )
    pids = list(wait_workers_up(tunnel, 2).values())
    try:
        mark = server.log_mark()
        go.touch()
        assert tunnel.wait(DEADLINE) == 0, tunnel.describe()
        assert tunnel.events("stopping")[-1]["reason"] == "command finished"
        # It stopped the workers and waited for them: they are gone (and reaped) once it
        # is, each having ended its SSH session itself.
        assert [pid for pid in pids if pid_alive(pid)] == [], tunnel.describe()
        assert wait_until(lambda: not server.children(), DEADLINE), server.children()
        assert server.log_text(mark).count(DISCONNECTED) == 3, server.log_text(mark)
        assert len(ran.read_text().splitlines()) == 1  # the workers run no command
        assert len(tunnel.events("ready")) == 1  # and announce no ready of their own
    finally:
        kill_leftovers(pids)


def test_workers_end_on_their_own_when_the_first_process_is_killed(
    sshd: SshdServer, pytunnel_factory: PytunnelFactory
) -> None:
    tunnel, ups = start_workers(pytunnel_factory, sshd, 3)
    pids = list(ups.values())
    try:
        tunnel.kill()
        assert wait_until(lambda: not any(map(pid_alive, pids)), DEADLINE), [
            (pid, _stat_fields(pid)) for pid in pids
        ]
    finally:
        kill_leftovers(pids)
    # Nothing accepts on the port any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(tunnel.address, timeout=DEADLINE).close()


# -- a worker that cannot log in --------------------------------------------------------------


def test_a_worker_that_cannot_answer_a_password_prompt_fails_for_good(
    asyncssh_server: AsyncsshServer, tmp_path: Path, echo_target: EchoTarget
) -> None:
    pytest.importorskip("pexpect")
    from fixtures.pty_driver import PtyTunnel

    user, password = ALICE
    args = [
        "--json", "--workers", "2", "-D", "127.0.0.1:0",
        "-o", "PubkeyAuthentication=no", *server_args(asyncssh_server, user=user),
    ]  # fmt: skip
    running = PtyTunnel(args, tmp_path / "pty")
    try:
        running.expect(f"{user}@{asyncssh_server.host}:{asyncssh_server.port}'s password: ")
        running.answer_secret(password)
        ready = running.wait_event("ready")
        state = running.wait_event("worker_state", timeout=DEADLINE)
        assert (state["worker"], state["state"]) == (1, "failed"), running.describe()
        assert state["reason"].endswith("it is not started again"), state
        assert not pid_alive(state["pid"])
        # Not started again: past the longest restart delay there is still no worker.
        time.sleep(3.0)
        assert worker_pids(running.pid) == [], running.describe()
        assert [e["state"] for e in running.events() if e["event"] == "worker_state"] == ["failed"]
        # The worker typed nothing: the terminal asked once.
        assert running.transcript.count("'s password: ") == 1, running.describe()
        # The first process serves on.
        host, port = ready["listeners"][0]["host"], ready["listeners"][0]["port"]
        sock, reply = socks5_open((host, port), "127.0.0.1", echo_target.port)
        with sock:
            assert reply == SOCKS5_OK
            sock.sendall(b"still serving")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == EchoTarget.expected_reply(b"still serving")
        assert running.stop() == 0, running.describe()
    finally:
        running.kill()


# -- SIGHUP ---------------------------------------------------------------------------------


def test_sighup_reconnects_every_worker(
    make_sshd: Callable[..., SshdServer],
    pytunnel_factory: PytunnelFactory,
    echo_target: EchoTarget,
) -> None:
    server = make_sshd()
    tunnel, ups = start_workers(pytunnel_factory, server, 3)
    assert wait_until(lambda: len(server.children()) == 3, DEADLINE), server.children()
    mark = server.log_mark()
    tunnel.send_signal(signal.SIGHUP)
    assert tunnel.wait_event("session_up", timeout=DEADLINE)["cause"] == "sighup"
    for number, pid in ups.items():
        tunnel.wait_event("worker_state", timeout=DEADLINE, worker=number, state="lost")
        back = tunnel.wait_events("worker_state", 2, timeout=DEADLINE, worker=number, state="up")
        assert back[1]["pid"] == pid  # the same process, a new session
    states = [(e["worker"], e["state"]) for e in tunnel.events("worker_state")]
    for number in ups:
        assert [s for w, s in states if w == number] == ["up", "lost", "up"], states
    # Three new logins; once the old sessions are let go, three connections again.
    assert wait_until(lambda: server.log_text(mark).count(ACCEPTED) >= 3, DEADLINE)
    assert server.log_text(mark).count(ACCEPTED) == 3, server.log_text(mark)
    assert wait_until(lambda: len(server.children()) == 3, DEADLINE), server.children()
    # Every process serves on its new session.
    echo_through(tunnel, echo_target.port, b"first process")
    with stopped(tunnel.pid):
        echo_through(tunnel, echo_target.port, b"a worker")
    assert worker_pids(tunnel.pid) == sorted(ups.values())


# -- usage ------------------------------------------------------------------------------------


def test_more_workers_than_max_connections_is_a_usage_error() -> None:
    result = run_pytunnel(
        ["--workers", "3", "--max-connections", "2", "-D", "0", "nobody@127.0.0.1"]
    )
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr
    [line] = result.stderr_lines
    assert "--workers" in line, line
    assert error_lines(result) == [line]

"""Quick-LPC by default: which connections get the rings when nobody chose.

A port's ``quick_lpc`` is None unless set: it offers the rings where the kernel attests each
ring message's sender, to the clients that ask for them (a native client whose Config takes
them). A client that would only close the ring memfd does not ask, so none is built for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import alpc
from alpc import qlpc
from alpc.protocol import QUICK_ID_BIT
from tests.background import Background
from tests.local_pairs import local_connection

pytestmark = pytest.mark.timeout(30)

QLPC_PEERS = Path(__file__).resolve().parent / "qlpc_peers.py"


def _round_trip(server: alpc.CommunicationPort, client: alpc.CommunicationPort) -> alpc.Message:
    """One request() answered by a server thread; the request as the server saw it."""

    def answer() -> alpc.Message:
        request = server.receive(timeout=5)
        request.reply(request.data.upper())
        return request

    serving = Background(answer)
    assert client.request(b"ping", timeout=5).data == b"PING"
    serving.join(5)
    (request,) = serving.outcomes
    assert isinstance(request, alpc.Message) and request.data == b"ping"
    return request


def _takes_the_ring(server: alpc.CommunicationPort, client: alpc.CommunicationPort) -> bool:
    """Does a request() take the ring once the connection settles? A request may take the
    socket now and then (the server not attached yet, a doorbell the server has not consumed
    yet: the rings never overtake the socket), so a few round trips, each answered."""
    return any(_round_trip(server, client).id & QUICK_ID_BIT for _ in range(20))


def test_a_port_left_at_its_defaults_gives_a_native_client_the_rings(broker: alpc.Broker,
                                                                      config: alpc.Config) -> None:
    assert alpc.PortAttributes().quick_lpc is None
    expected = qlpc.offered_by(alpc.PortAttributes()) and qlpc.asked_by(config)
    assert expected is qlpc.attested()
    with local_connection(config, "quick.default") as (_, server, client):
        assert _takes_the_ring(server, client) is expected
        assert client.quick is expected and server.quick is expected


def test_a_client_that_declines_gets_no_rings_built(broker: alpc.Broker, config: alpc.Config) -> None:
    """The server made, mapped and passed a ring memfd to a client that closed it at once."""
    declining = dataclasses.replace(config, quick_lpc=False)
    with alpc.create_port("quick.declined", alpc.PortAttributes(quick_lpc=True), config=config) as port, \
            contextlib.ExitStack() as stack:
        server, client = _connect(stack, port, declining, "quick.declined")
        assert server._quick is None and port.rings_held == 0
        request = _round_trip(server, client)
        assert not request.id & QUICK_ID_BIT and not client.quick and not server.quick


def test_a_port_that_refuses_identity_changes_keeps_to_the_socket(broker: alpc.Broker,
                                                                  config: alpc.Config) -> None:
    attributes = alpc.PortAttributes(refuse_identity_change=True)
    assert not qlpc.offered_by(attributes)
    with local_connection(config, "quick.refusing", attributes) as (_, server, client):
        assert server._quick is None
        assert not _round_trip(server, client).id & QUICK_ID_BIT


def test_quick_lpc_takes_a_bool_or_none() -> None:
    assert alpc.PortAttributes(quick_lpc=None).quick_lpc is None
    with pytest.raises(ValueError, match="quick_lpc must be a bool or None"):
        alpc.PortAttributes(quick_lpc=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Quick-LPC"):
        alpc.PortAttributes(quick_lpc=True, refuse_identity_change=True)
    assert not qlpc.offered_by(alpc.PortAttributes(quick_lpc=False))


def test_a_port_left_at_its_defaults_gives_rings_within_its_fd_budget(broker: alpc.Broker, config: alpc.Config,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ring connection costs two more fds a side: past qlpc.ring_budget() connections a
    default port keeps the next ones on their socket; a port that asked for rings outright
    (quick_lpc=True) is not held to it."""
    if not qlpc.offered_by(alpc.PortAttributes()):
        pytest.skip("this process offers no rings by default")
    monkeypatch.setattr(qlpc, "ring_budget", lambda: 1)
    with local_connection(config, "quick.budget") as (port, first_server, first), \
            contextlib.ExitStack() as stack:
        _round_trip(first_server, first)
        assert first.quick and port.rings_held == 1
        second_server, second = _connect(stack, port, config, "quick.budget")
        assert second_server._quick is None and not second.quick and port.rings_held == 1
    with local_connection(config, "quick.asked", alpc.PortAttributes(quick_lpc=True)) as (port, _, first), \
            contextlib.ExitStack() as stack:
        second_server, second = _connect(stack, port, config, "quick.asked")
        assert second_server._quick is not None and port.rings_held == 2


def _connect(stack: contextlib.ExitStack, port: alpc.ConnectionPort, config: alpc.Config,
             name: str) -> tuple[alpc.CommunicationPort, alpc.CommunicationPort]:
    """Another connection to ``port`` (server side, client side), closed with ``stack``."""
    connecting = Background(lambda: alpc.connect(name, config=config, timeout=10))
    server = stack.enter_context(port.listen(timeout=10).accept())
    connecting.join(10)
    (client,) = connecting.outcomes
    assert isinstance(client, alpc.CommunicationPort)
    stack.enter_context(client)
    return server, client


def test_the_ring_budget_is_a_sixteenth_of_the_fd_limit() -> None:
    probe = ("import resource; from alpc import qlpc; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
             "resource.setrlimit(resource.RLIMIT_NOFILE, (160, hard)); print(qlpc.ring_budget())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.strip() == "10"


def test_a_default_port_once_used_with_wait_offers_no_more_rings(broker: alpc.Broker, config: alpc.Config) -> None:
    """A multiplexing server sleeps in poll() on the sockets: a ring post would reach it only
    with a doorbell frame on the socket too. Its first wait() ends the default offer; a
    connection that has its rings already keeps them, and a port that asked (True) offers on."""
    if not qlpc.offered_by(alpc.PortAttributes()):
        pytest.skip("this process offers no rings by default")
    with local_connection(config, "quick.multiplexed") as (port, ring_server, ring_client), \
            contextlib.ExitStack() as stack:
        assert _takes_the_ring(ring_server, ring_client)
        with pytest.raises(alpc.Timeout):
            port.wait(timeout=0)
        server, client = _connect(stack, port, config, "quick.multiplexed")
        assert server._quick is None and port.rings_held == 1
        assert not _round_trip(server, client).id & QUICK_ID_BIT
        assert _takes_the_ring(ring_server, ring_client)  # the first keeps its rings
    with alpc.create_port("quick.asked.wait", alpc.PortAttributes(quick_lpc=True), config=config) as port, \
            contextlib.ExitStack() as stack:
        with pytest.raises(alpc.Timeout):
            port.wait(timeout=0)
        server, _ = _connect(stack, port, config, "quick.asked.wait")
        assert server._quick is not None


# A client with three fds free: a connection on its socket takes two (the socket, the server's
# pidfd); the rings take five more (their memfd for a moment, the watcher's copies of the socket
# and pidfd, its epoll set and eventfd). Each connect starts from the same count.
_SHORT_OF_FDS = r"""
import dataclasses, gc, os, resource, sys
import alpc
config = alpc.Config.from_env(sys.argv[1])
socket_only = dataclasses.replace(config, quick_lpc=False)
alpc.connect(sys.argv[2], config=socket_only, timeout=10).close()  # (imports done: they open files)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []

def connect_with_fds_free(config, free=3):
    gc.collect()
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for _ in range(free):
        os.close(held.pop())
    try:
        with alpc.connect(sys.argv[2], config=config, timeout=10) as comm:
            print("CONNECTED", comm.quick, comm.request(b"ping", timeout=10).data.decode())
    except alpc.AlpcError as exc:
        print("FAILED", type(exc).__name__, exc)
    except ValueError as exc:
        print("RAW", type(exc).__name__, exc)
    for fd in held:
        os.close(fd)
    held.clear()

if sys.argv[3] == "rings":
    connect_with_fds_free(socket_only)
    connect_with_fds_free(config)
else:
    connect_with_fds_free(socket_only, 1)
"""


def test_a_client_that_cannot_set_up_the_rings_connects_on_its_socket(broker: alpc.Broker, config: alpc.Config,
                                                                      spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    """Rings offered, asked for, and the client out of fds for them: the connect failed with
    QuotaExceeded where the socket alone works. The rings are an optimisation: it stays on its socket."""
    if not qlpc.available():
        pytest.skip(str(qlpc.unavailable_reason()))
    server = spawn.argv([sys.executable, str(QLPC_PEERS), "server", "quick.short", "--runtime-dir", str(runtime_dir),
                         "--mode", "receive"])
    server.expect("READY")
    out = subprocess.run([sys.executable, "-c", _SHORT_OF_FDS, str(runtime_dir), "quick.short", "rings"],
                         capture_output=True, text=True, timeout=40, check=True)
    assert out.stdout.splitlines() == ["CONNECTED False PING"] * 2, out.stdout + out.stderr


def test_a_client_with_one_fd_free_connects_without_the_servers_pidfd(broker: alpc.Broker, spawn,  # type: ignore[no-untyped-def]
                                                                      runtime_dir) -> None:
    """The connect socket takes the last fd: the kernel cannot install the server's pidfd that
    rides on its reply (SCM_PIDFD) and says so as -EMFILE in the message. That -24 was kept as the
    pidfd, and watching it raised ValueError; the client goes on without one (death by EOF)."""
    server = spawn.argv([sys.executable, str(QLPC_PEERS), "server", "quick.one", "--runtime-dir", str(runtime_dir),
                         "--mode", "receive"])
    server.expect("READY")
    out = subprocess.run([sys.executable, "-c", _SHORT_OF_FDS, str(runtime_dir), "quick.one", "pidfd"],
                         capture_output=True, text=True, timeout=40, check=True)
    assert out.stdout.splitlines() == ["CONNECTED False PING"], out.stdout + out.stderr


def _threads() -> int:
    """Threads of this process that Python did not start (the C watcher)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def test_a_default_port_starts_the_watcher_thread_with_its_first_ring_connection(
        broker: alpc.Broker, config: alpc.Config) -> None:
    """The C watcher thread (and its epoll set and eventfd) stays for a port's life once it gives
    rings; a port left at its defaults that never does (a wait() loop, an asyncio port) keeps none."""
    if not qlpc.offered_by(alpc.PortAttributes()):
        pytest.skip("this process offers no rings by default")
    before = _threads()
    with alpc.create_port("quick.watcher", config=config) as port:
        assert _threads() == before and not port._quick_held
        with pytest.raises(alpc.Timeout):
            port.wait(timeout=0)  # a wait() loop: never gives rings
        assert _threads() == before
    with alpc.create_port("quick.watcher.asked", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        assert _threads() == before + 1 and port._quick_held
    assert _threads() == before
    with local_connection(config, "quick.watcher.ring") as (port, _, client):
        assert client.quick and port._quick_held

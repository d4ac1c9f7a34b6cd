"""Objects the application drops without finishing with them: the peer is told at once,
nothing is held for ever (real client processes)."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
from pathlib import Path

import pytest

import alpc
from alpc import aio

PEERS = Path(__file__).resolve().parent / "dropped_peers.py"


@pytest.fixture
def peer(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(role: str, name: str, *args: str):  # type: ignore[no-untyped-def]
        started = spawn.argv([sys.executable, str(PEERS), role, name, "--runtime-dir", str(runtime_dir), *args])
        started.expect("STARTED")
        return started
    return start


@pytest.mark.timeout(40)
def test_a_connection_request_dropped_unanswered_rejects_its_client_and_frees_its_slot(
        broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """A ConnectionRequest from listen() that is neither accepted nor rejected and then dropped
    (an exception path, a forgotten variable): its client must hear a rejection at once, not
    wait out its (60 s) connect timeout, and the port must not count it toward max_connections
    for the rest of its life."""
    name = "dropped.request"
    with alpc.create_port(name, alpc.PortAttributes(max_connections=1), config=config) as port:
        first = peer("connect", name, "--timeout", "60")
        request = port.listen(timeout=10)
        assert request.client.pid == first.pid
        del request
        gc.collect()
        assert first.expect("OUTCOME", timeout=10)[0] == "ConnectionRejected"
        second = peer("connect", name, "--timeout", "10")
        port.listen(timeout=10).accept()
        second.expect("CONNECTED")


@pytest.mark.timeout(40)
def test_a_client_port_dropped_without_close_tells_the_server_and_leaks_no_fd(
        broker, config, spawn) -> None:  # type: ignore[no-untyped-def]
    """A client's CommunicationPort dropped without close(): the server hears the connection
    end at once, and the port's fds must not outlive it: the garbage collector closes a socket
    object, never the raw pidfd of the server the port watches (the leak check fails the test
    on an fd left open, as it did: one pidfd per dropped port, for the process's life)."""
    server = spawn("server", "dropped.comm")
    server.expect("READY")
    comm = alpc.connect("dropped.comm", config=config, timeout=10)
    server.expect("ACCEPTED")
    assert comm.request(b"hi", timeout=10).data == b"HI"
    del comm
    gc.collect()
    assert server.expect("", timeout=10)[0] in ("PORT_CLOSED", "CLIENT_DIED")


@pytest.mark.timeout(40)
def test_a_connection_port_dropped_without_close_gives_its_name_and_fds_back(
        broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """A ConnectionPort dropped without close(): its keeper thread held it for ever, so the name
    stayed registered with nobody listening (a client waited out its whole 60 s connect timeout)
    and the port's link, epoll set and eventfds stayed open for the process's life."""
    name = "dropped.port"
    port = alpc.create_port(name, config=config)
    keepers = [thread for thread in threading.enumerate() if thread.name == f"alpc-port-{name}"]
    assert len(keepers) == 1
    del port
    gc.collect()
    keepers[0].join(10)  # the keeper lets go of the link once the port is gone
    assert not keepers[0].is_alive()
    client = peer("connect", name, "--timeout", "60")
    # The broker saw the link go (PortNotFound), or had just passed the connect on to it (PeerGone).
    assert client.expect("OUTCOME", timeout=10)[0] in ("PortNotFound", "PeerGone")


@pytest.mark.timeout(40)
def test_an_asyncio_client_port_left_open_when_its_loop_ends_leaks_no_fd(
        broker, config, spawn) -> None:  # type: ignore[no-untyped-def]
    """An asyncio connection never closed, its loop ended (asyncio.run returned): the loop let
    go of it and it is collected, but the raw pidfd of the server it watched stayed open for
    the process's life (the leak check fails the test on it); the server hears the end."""
    server = spawn("server", "dropped.aio")
    server.expect("READY")

    async def forget() -> None:
        comm = await aio.connect("dropped.aio", config=config, timeout=10)
        assert (await comm.request(b"hi", timeout=10)).data == b"HI"

    asyncio.run(forget())
    gc.collect()
    server.expect("ACCEPTED")
    assert server.expect("", timeout=10)[0] in ("PORT_CLOSED", "CLIENT_DIED")


@pytest.mark.timeout(40)
def test_an_asyncio_connection_request_dropped_unanswered_rejects_its_client(
        broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """The same through the asyncio driver: an AsyncConnectionRequest from listen() dropped."""
    name = "dropped.aio.request"

    async def drop_one() -> None:
        async with await aio.create_port(name, config=config) as port:
            first = peer("connect", name, "--timeout", "60")
            request = await port.listen(timeout=10)
            assert request.client.pid == first.pid
            del request
            gc.collect()
            outcome = await asyncio.get_running_loop().run_in_executor(None, lambda: first.expect("OUTCOME", 10))
            assert outcome[0] == "ConnectionRejected"

    asyncio.run(drop_one())

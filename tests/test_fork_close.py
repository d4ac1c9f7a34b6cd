"""A forked child that closes the ports it inherited must leave its parent's ports working.

A pre-fork server (or any ``os.fork()`` after setup) hands the child copies of every fd: the
sockets, the broker link, the epoll set and the eventfds are the parent's own open files, shared.
So ``socket.shutdown()``, a PORT_CLOSED frame, an epoll unregister or an eventfd write in the
child acts on the parent's connection or port, not on a private copy.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import alpc
import alpc.aio
from alpc import rpc
from alpc.wire import MessageType

pytestmark = pytest.mark.timeout(60)


def in_child(action: Callable[[], object], timeout: float = 10.0) -> int | None:
    """Run ``action`` in a forked child, then ``os._exit``: its exit code (None: killed when stuck)."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            action()
            code = 0
        finally:
            os._exit(code)
    pidfd = os.pidfd_open(child)
    try:
        exited, _, _ = select.select([pidfd], [], [], timeout)  # readable once the child exited
    finally:
        os.close(pidfd)
    if not exited:
        os.kill(child, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) if exited else None


def in_child_while_held(lock: Any, action: Callable[[], object]) -> int | None:
    """``in_child(action)`` while another thread of this process holds ``lock``, as a thread
    mid-send or mid-read does at a fork: in the child nobody will ever release it."""
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        return in_child(action, timeout=10)
    finally:
        done.set()
        holder.join(10)

def test_a_child_closing_its_copy_of_a_client_port_leaves_the_parents_connection(
        broker: alpc.Broker, config: alpc.Config, spawn) -> None:  # type: ignore[no-untyped-def]
    server = spawn("server", "fork.client")
    server.expect("READY")
    with alpc.connect("fork.client", config=config, timeout=5) as comm:
        server.expect("ACCEPTED")
        assert comm.call(b"before", timeout=5) == b"BEFORE"
        assert in_child(comm.close) == 0
        # The parent never closed its port: the server must not have heard PORT_CLOSED,
        # and the connection must still carry requests.
        assert comm.call(b"after", timeout=5) == b"AFTER"
    server.expect("PORT_CLOSED")  # the parent's own close, the first notice the server gets


def test_a_child_closing_its_copy_of_a_connection_port_keeps_the_parents_name(
        broker: alpc.Broker, config: alpc.Config, spawn) -> None:  # type: ignore[no-untyped-def]
    with alpc.create_port("fork.name", config=config, reregister_timeout=0) as port:
        assert in_child(port.close) == 0
        client = spawn("client", "fork.name")
        comm = port.listen(timeout=5).accept(data=b"hi")
        client.expect("READY")
        assert port.registered
        client.send("request ping")
        message = port.wait(timeout=5)
        assert isinstance(message, alpc.Message) and message.data == b"ping"
        message.reply(b"pong")
        assert client.expect("REPLY") == ["pong"]
        comm.close()


def test_a_child_closing_its_copy_of_a_connection_port_leaves_its_connections(
        broker: alpc.Broker, config: alpc.Config, spawn) -> None:  # type: ignore[no-untyped-def]
    with alpc.create_port("fork.conns", config=config) as port:
        client = spawn("client", "fork.conns")
        comm = port.listen(timeout=5).accept(data=b"hi")
        client.expect("READY")
        assert in_child(port.close) == 0
        client.send("request ping")
        # The parent's epoll set must still watch the connection (the child shares it), and
        # the client must not have been told the port closed.
        message = port.wait(timeout=5)
        assert isinstance(message, alpc.Message) and message.type is MessageType.REQUEST, message
        assert message.data == b"ping"
        message.reply(b"pong")
        assert client.expect("REPLY") == ["pong"]
        assert not comm.closed


def test_a_child_closing_its_copy_of_an_accepted_port_leaves_the_client_connected(
        broker: alpc.Broker, config: alpc.Config, spawn) -> None:  # type: ignore[no-untyped-def]
    with alpc.create_port("fork.accepted", config=config) as port:
        client = spawn("client", "fork.accepted")
        comm = port.listen(timeout=5).accept(data=b"hi")
        client.expect("READY")
        assert in_child(comm.close) == 0
        client.send("request ping")
        message = port.wait(timeout=5)
        assert isinstance(message, alpc.Message) and message.type is MessageType.REQUEST, message
        message.reply(b"pong")
        assert client.expect("REPLY") == ["pong"]


def _run_to_end(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends, without an event loop (the child inherited the parent's)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise AssertionError("the coroutine waited")


def test_a_child_closing_its_copy_of_an_async_port_leaves_the_parents_connection(
        broker: alpc.Broker, config: alpc.Config, spawn) -> None:  # type: ignore[no-untyped-def]
    server = spawn("server", "fork.aio")
    server.expect("READY")

    async def main() -> None:
        comm = await alpc.aio.connect("fork.aio", config=config, timeout=5)
        try:
            assert (await comm.request(b"before", timeout=5)).data == b"BEFORE"
            # The loop's epoll set is shared with the child: its close must not unwatch the socket.
            assert in_child(lambda: _run_to_end(comm.close())) == 0
            assert (await comm.request(b"after", timeout=5)).data == b"AFTER"
        finally:
            await comm.close()

    asyncio.run(main())
    server.expect("PORT_CLOSED")


def test_a_child_stopping_its_copy_of_an_rpc_server_leaves_the_parents_server(
        broker: alpc.Broker, config: alpc.Config) -> None:
    from rpc_peers import StoreImpl  # tests/ is on sys.path, as for tests/test_rpc_e2e.py
    from test_rpc_e2e import NAME, connect

    with rpc.Server(NAME, StoreImpl(), config=config, workers=2) as server, connect(config) as client:
        assert client.proxy.pid() == os.getpid()
        assert in_child(server.stop) == 0
        assert client.proxy.pid() == os.getpid()
        with connect(config) as later:  # the name is still the parent's
            assert later.proxy.pid() == os.getpid()


def test_a_child_cannot_serve_its_copy_of_a_connection_port(
        broker: alpc.Broker, config: alpc.Config, spawn) -> None:  # type: ignore[no-untyped-def]
    """wait() and listen() in a forked child read the parent's broker link and epoll set: two
    readers split the link's frames (and the client fds they carry). They raise at once."""
    with alpc.create_port("fork.serve", config=config) as port:
        def serve_in_child() -> None:
            for wait in (port.wait, port.listen):
                with pytest.raises(alpc.ConnectionClosed, match="forked child"):
                    wait(timeout=5)
            port.close()
        assert in_child(serve_in_child) == 0
        client = spawn("client", "fork.serve")
        port.listen(timeout=5).accept(data=b"hi").close()
        client.expect("READY")

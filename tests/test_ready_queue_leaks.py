"""Per-connection state a ConnectionPort keeps after the connection is gone.

A server that reads its connections itself (``listen().accept()`` then ``comm.receive()``,
the README's own pattern) never calls ``port.wait()``. Whatever the port queues for wait()
must then stay bounded: one entry per message or per closed connection is a slow leak that
the fd and /dev/shm checks cannot see (a long-running server sees millions of connects).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest

import alpc
from alpc import _native

pytestmark = pytest.mark.timeout(120)

native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))

CONNECTIONS = 3
REQUESTS = 20


def _serve_one_client(port: alpc.ConnectionPort, spawn: Callable[..., Any], name: str,
                      gone: list[weakref.ref[alpc.CommunicationPort]]) -> None:
    """A client process connects, sends requests and a datagram, closes; the server answers
    each with ``comm.receive()`` (never ``port.wait()``) and closes its side."""
    peer = spawn("client", name)
    comm = port.listen(timeout=10).accept()
    peer.expect("READY")
    for i in range(REQUESTS):
        peer.send(f"request r{i}")
        message = comm.receive(timeout=10)
        comm.reply(message, message.data.upper())
        assert peer.expect("REPLY") == [f"R{i}"]
    peer.send("send bye")
    assert comm.receive(timeout=10).data == b"bye"
    peer.expect("SENT")
    peer.send("close")
    peer.expect("CLOSED")
    assert comm.receive(timeout=10).type is alpc.MessageType.PORT_CLOSED
    comm.close()
    peer.close()
    gone.append(weakref.ref(comm))


@pytest.mark.parametrize("quick_lpc", [False, pytest.param(True, marks=native)])
def test_a_server_that_receives_itself_keeps_no_closed_connection(
        broker: alpc.Broker, config: alpc.Config, spawn: Callable[..., Any], quick_lpc: bool) -> None:
    """Every message that reached a connection appended it to the port's ``_ready`` queue,
    which only ``port.wait()`` drains: a server using ``comm.receive()`` grew it by one entry
    per message, and each closed CommunicationPort (socket buffers, section pool, stats,
    channel) stayed reachable from the port until the port closed."""
    name = "svc.state.ready"
    with alpc.create_port(name, alpc.PortAttributes(quick_lpc=quick_lpc), config=config) as port:
        gone: list[weakref.ref[alpc.CommunicationPort]] = []
        for _ in range(CONNECTIONS):
            _serve_one_client(port, spawn, name, gone)
            assert len(port._ready) <= 1  # not one per message
        gc.collect()
        assert len(port._ready) == 0
        assert [ref for ref in gone if ref() is not None] == []  # nothing holds a closed connection
        assert port.connections == []


@native
def test_closed_quick_connections_leave_no_entry_to_arm(broker: alpc.Broker, config: alpc.Config,
                                                         spawn: Callable[..., Any]) -> None:
    """Quick-LPC: each connection put itself in ``_quick_unarmed`` when accepted and on its
    first take; only ``port.wait()`` pops those entries. A server using ``comm.receive()``
    kept two dead weak references per connection it ever had."""
    name = "svc.state.unarmed"
    with alpc.create_port(name, alpc.PortAttributes(quick_lpc=True), config=config) as port:
        gone: list[weakref.ref[alpc.CommunicationPort]] = []
        for _ in range(CONNECTIONS):
            _serve_one_client(port, spawn, name, gone)
        assert len(port._quick_unarmed) == 0
        assert len(port._quick_comms) == 0

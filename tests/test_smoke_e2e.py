"""The issue's headline example, across real processes."""

from __future__ import annotations

import alpc


def test_request_reply_across_processes(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "demo.echo")
    server.expect("READY")
    with alpc.connect("demo.echo", data=b"hello", timeout=5, config=config) as comm:
        assert comm.server.pid == server.pid
        assert comm.accept_data == b"welcome hello"
        reply = comm.request(b"ping", timeout=5)
        assert reply.data == b"PING"
        assert reply.type is alpc.MessageType.REPLY
        comm.send(b"fire and forget")
        assert server.expect("DATAGRAM") == ["fire", "and", "forget"]
    assert server.expect("PORT_CLOSED")[0] == str(__import__("os").getpid())

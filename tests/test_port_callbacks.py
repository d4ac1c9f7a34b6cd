"""CommunicationPort.request(on_message=): serving the peer's nested requests while waiting."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import alpc

RPC_PEERS = str(Path(__file__).resolve().parent / "rpc_peers.py")


def start_callback_server(spawn: Any, runtime_dir: Path, name: str, *args: str) -> Any:
    peer = spawn.argv([sys.executable, RPC_PEERS, "callback-server", name, "--runtime-dir", str(runtime_dir), *args])
    peer.expect("READY")
    return peer


def test_the_peer_calls_back_while_we_wait(broker: alpc.Broker, config: alpc.Config, spawn: Any,
                                          runtime_dir: Path) -> None:
    start_callback_server(spawn, runtime_dir, "svc.nested")
    seen: list[tuple[alpc.MessageType, bytes, bool]] = []
    caller = threading.get_ident()
    with alpc.connect("svc.nested", config=config, timeout=10) as comm:

        def serve(message: alpc.Message) -> None:
            seen.append((message.type, message.data, threading.get_ident() == caller))
            if message.type is alpc.MessageType.REQUEST:
                # One level deeper: the server serves this while it waits for our answer.
                deeper = comm.request(b"deeper", timeout=10, on_message=serve)
                message.reply(b"answer+" + deeper.data)

        reply = comm.request(b"x", timeout=10, on_message=serve)
        assert reply.data == b"done:answer+nested:deeper"
        assert seen == [(alpc.MessageType.DATAGRAM, b"note:x", True),
                        (alpc.MessageType.REQUEST, b"callback:x", True)]
        # The connection is in order afterwards.
        seen.clear()
        assert comm.request(b"y", timeout=10, on_message=serve).data == b"done:answer+nested:deeper"


def test_without_the_hook_the_callback_waits_in_the_inbox(broker: alpc.Broker, config: alpc.Config,
                                                          spawn: Any, runtime_dir: Path) -> None:
    start_callback_server(spawn, runtime_dir, "svc.parked", "--callback-timeout", "3")
    with alpc.connect("svc.parked", config=config, timeout=10) as comm:
        pending = comm.start_request(b"x", timeout=10)
        assert comm.receive(timeout=5).data == b"note:x"
        parked = comm.receive(timeout=5)
        assert (parked.type, parked.data) == (alpc.MessageType.REQUEST, b"callback:x")
        parked.reply(b"late")
        assert pending.result(timeout=10).data == b"done:late"


def test_a_callback_its_server_gave_up_on_is_withdrawn(broker: alpc.Broker, config: alpc.Config,
                                                       spawn: Any, runtime_dir: Path) -> None:
    server = start_callback_server(spawn, runtime_dir, "svc.withdrawn", "--callback-timeout", "0.3")
    with alpc.connect("svc.withdrawn", config=config, timeout=10) as comm:
        with pytest.raises(alpc.Timeout):
            comm.request(b"x", timeout=1.0)
        server.expect("CALLBACK_TIMEOUT")
        assert comm.receive(timeout=5).data == b"note:x"
        # The server's timed-out callback request was cancelled: it is never dispatched here.
        with pytest.raises(alpc.Timeout):
            comm.receive(timeout=0.3)


def test_an_error_in_the_hook_abandons_the_request(broker: alpc.Broker, config: alpc.Config, spawn: Any,
                                                   runtime_dir: Path) -> None:
    server = start_callback_server(spawn, runtime_dir, "svc.hookfail", "--callback-timeout", "0.3")
    with alpc.connect("svc.hookfail", config=config, timeout=10) as comm:

        def refuse(message: alpc.Message) -> None:
            if message.type is alpc.MessageType.REQUEST:
                raise LookupError("no handler for " + message.data.decode())

        with pytest.raises(LookupError, match="callback:x"):
            comm.request(b"x", timeout=10, on_message=refuse)
        # The nested request the hook failed on was dropped unanswered: the server hears so at
        # once (its 0.3 s callback timeout would be the other outcome, were it still held).
        server.expect("CALLBACK_UNANSWERED")
        answered = comm.request(b"y", timeout=10, on_message=lambda m: m.type is alpc.MessageType.REQUEST
                                and m.reply(b"ok"))
        assert answered.data == b"done:ok"

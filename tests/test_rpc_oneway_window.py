"""An RPC server queues no more of one client's one-way calls than the port's window allows.

``rpc.Server`` takes a client's one-way call (a datagram) out of the port, which gives its
window slot back, and queues it behind the call still running for that client; the worker
that takes one waits its turn only past ``ONEWAY_BACKLOG`` (1024) queued. A port made with
``max_queued_datagrams=8`` so that a client could never have more than 8 calls waiting in
server memory still had 1024 of them (each up to ``max_message_length``) queued per client. The
client is a real process (tests/window_flood_peers.py); line handshakes order it, and the one-way
handler blocks on an event the test sets.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from window_flood_peers import Sink

import alpc
from alpc import rpc

PEERS = Path(__file__).resolve().parent / "window_flood_peers.py"
WINDOW = 8
WORKERS = 2
FLOOD = 1200  # past ONEWAY_BACKLOG: the unfixed server holds the client back only there

pytestmark = pytest.mark.timeout(90)


class SlowSink(Sink):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.done = threading.Condition()
        self.seen: list[int] = []

    def put(self, index: int) -> None:
        self.release.wait(60)  # the first call holds the client's turn until the test says
        with self.done:
            self.seen.append(index)
            self.done.notify_all()


def test_one_way_calls_wait_within_the_ports_window(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    sink = SlowSink()
    attributes = alpc.PortAttributes(max_queued_datagrams=WINDOW)
    server = rpc.Server("svc.q9.rpc", sink, workers=WORKERS, attributes=attributes, config=config)
    with server:
        client = spawn.argv([sys.executable, str(PEERS), "rpc-client", "svc.q9.rpc", "--runtime-dir", str(runtime_dir)])
        try:
            client.expect("READY")
            client.send(f"flood {FLOOD} 1")
            sent = int(client.expect("FLOODED", timeout=60)[0])
            queued = sum(len(endpoint._oneways) for endpoint in list(server._endpoints.values()))
            # The window's worth, and the one each worker but the runner took and waits with.
            assert queued <= WINDOW + WORKERS - 1, f"{queued} one-way calls of one client queued, past its window"
            # Those, the one running, and the window's worth in the inbox.
            assert sent <= 2 * WINDOW + WORKERS, f"{sent} one-way calls went out against a window of {WINDOW}"
            sink.release.set()
            # Calls that waited past their deadline (the 1 s each was sent with) are dropped by
            # design; the rest run in order, and the client is served again once they drained.
            client.send("flood 3 10")
            assert client.expect("FLOODED") == ["3"]
            with sink.done:
                assert sink.done.wait_for(lambda: sink.seen[-3:] == [0, 1, 2], 30), sink.seen
            assert sink.seen[:-3] == sorted(set(sink.seen[:-3])), sink.seen
            client.send("quit")
            client.expect("BYE")
        finally:
            sink.release.set()

"""An ordered completion port serves every client, not only one that keeps sending.

``CompletionPort(ordered=True)`` hands out one message per client at a time; the thread whose
turn it is takes that client's next message straight from its inbox (``_next_in_turn``). The
inbox is refilled meanwhile (the pool's other waits, or the watcher of a saturated pool, read
every socket), so a client whose next message was always there by the time the last one was
handled kept its turn for good: with every thread of the pool in such a turn, the other
clients' messages (already read, waiting in the port's ready queue, or held by the thread
waiting for an async slot) were never handled while it sent. Before turns, the pool's own
queue only held what wait() had taken, so a turn ended after one round and wait() went on
round-robin.

Client C is a real process (tests/window_flood_peers.py) that sends datagrams as fast as its
window (8) allows; client D is a connection of the test's own. The handler returns once C's
next datagram has arrived (it waits for the watcher to read it: a condition, with a bound),
which is what a client sending faster than its messages are handled does.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import alpc
from alpc.completion import CompletionPort

PEERS = Path(__file__).resolve().parent / "window_flood_peers.py"
WINDOW = 8
FLOOD = 40

pytestmark = pytest.mark.timeout(90)


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait (a short wait at a time) until ``condition`` holds; False if it did not in time."""
    pause = threading.Event()
    for _ in range(int(timeout / 0.002)):
        if condition():
            return True
        pause.wait(0.002)
    return condition()


class _Scene:
    """What both handlers share: who was handled, in what order, and the conditions."""

    def __init__(self, port: alpc.ConnectionPort) -> None:
        self.port = port
        self.handled: list[bytes] = []
        self.d_sent = threading.Event()
        self.d_handled = threading.Event()
        self.all_handled = threading.Event()

    def d_waiting(self, c_comm: Any) -> bool:
        """D's datagram was read at the server (it waits in D's inbox, or in the hands of the
        thread that waits for an async slot), and is not handled yet."""
        others = [comm for comm in list(self.port._connections) if comm is not c_comm]
        return self.d_sent.is_set() and any(comm.stats.messages_in for comm in others)

    def before_return(self, message: alpc.Message) -> None:
        """C's datagram: return once C's next one has arrived (and, the first time, D's)."""
        data = bytes(message.data)
        if data == b"0":
            assert _until(lambda: self.d_waiting(message.port)), "D's datagram never reached the server"
        if int(data) < FLOOD - 1:
            arrived = int(data) + 2
            assert _until(lambda: message.port.stats.messages_in >= arrived or self.d_handled.is_set()), \
                "C's next datagram never arrived"

    def record(self, message: alpc.Message) -> None:
        data = bytes(message.data)
        self.handled.append(data)
        if data == b"D":
            self.d_handled.set()
        if len(self.handled) == FLOOD + 1:
            self.all_handled.set()


def _run(completion: CompletionPort, scene: _Scene, spawn: Any, runtime_dir: Path,
         config: alpc.Config) -> None:
    serving = threading.Thread(target=completion.serve)
    serving.start()
    client = spawn.argv([sys.executable, str(PEERS), "client", scene.port.name, "--runtime-dir", str(runtime_dir)])
    try:
        client.expect("READY")
        with alpc.connect(scene.port.name, config=config, timeout=10) as d:
            client.send(f"flood {FLOOD} 20")
            # C's first datagram is being handled (its handler waits for D's) before D sends.
            assert _until(lambda: bool(scene.handled)), "C's first datagram was never handled"
            d.send(b"D")
            scene.d_sent.set()
            assert client.expect("FLOODED", timeout=60) == [str(FLOOD)]
            assert scene.all_handled.wait(30), f"{len(scene.handled)} of {FLOOD + 1} handled"
        handled = scene.handled
        assert [data for data in handled if data != b"D"] == [str(i).encode() for i in range(FLOOD)]
        position = handled.index(b"D")
        assert position < FLOOD // 2, (
            f"D's datagram, waiting from C's first on, was handled after {position} of C's: "
            "C kept the only thread's turn as long as it sent")
        client.send("quit")
        client.expect("BYE")
    finally:
        scene.d_handled.set()
        completion.stop()
        serving.join(10)


def test_a_client_that_keeps_sending_does_not_keep_the_ordered_pools_turn(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    attributes = alpc.PortAttributes(max_queued_datagrams=WINDOW)
    with alpc.create_port("svc.fair", attributes, config=config) as port:
        scene = _Scene(port)

        def handler(message: alpc.Message) -> None:
            scene.record(message)
            if bytes(message.data) != b"D":
                scene.before_return(message)

        completion = CompletionPort(port, handler, max_workers=1, ordered=True)
        _run(completion, scene, spawn, runtime_dir, config)


def test_a_client_that_keeps_sending_does_not_keep_the_ordered_async_pools_slot(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    attributes = alpc.PortAttributes(max_queued_datagrams=WINDOW)
    with alpc.create_port("svc.fair.async", attributes, config=config) as port:
        scene = _Scene(port)

        async def handler(message: alpc.Message) -> None:
            scene.record(message)
            if bytes(message.data) != b"D":
                await asyncio.get_running_loop().run_in_executor(None, scene.before_return, message)

        completion = CompletionPort(port, handler, max_workers=1, ordered=True)
        _run(completion, scene, spawn, runtime_dir, config)

"""An ordered completion port holds no more of one client's datagrams than its window allows.

``CompletionPort(ordered=True)`` takes a client's messages out of the port while an earlier one
of the same client is being handled, and keeps them in a queue of its own until that client's
turn. Taking a datagram gives its window slot back to the client (a CREDIT frame), so a client
that sent as fast as it could against a slow handler had every datagram taken and queued: the
queue grew without bound (server memory at a hostile client's command) where the window should
have held the client back. The client is a real process (tests/window_flood_peers.py); line
handshakes order it, and the handler blocks on an event the test sets.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import alpc
from alpc.completion import CompletionPort

PEERS = Path(__file__).resolve().parent / "window_flood_peers.py"
WINDOW = 8
FLOOD = 400  # far more than the window (and the pool's threads) could ever hold

pytestmark = pytest.mark.timeout(90)


def _held(completion: CompletionPort, port: alpc.ConnectionPort) -> int:
    """Messages the server holds that no handler has begun: in its clients' inboxes (which the
    window bounds), plus, before the fix, the ordered pool's own queues (which nothing bounded)."""
    with completion._lock:
        queued = sum(len(waiting) for waiting in getattr(completion, "_busy", {}).values())
    return queued + sum(comm.queue_depth for comm in list(port._connections))


def test_an_ordered_pool_keeps_a_fast_clients_datagrams_within_its_window(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    release, all_handled = threading.Event(), threading.Event()
    handled: list[bytes] = []
    total: list[int] = []

    def handler(message: alpc.Message) -> None:
        release.wait(60)
        handled.append(bytes(message.data))
        if total and len(handled) == total[0]:
            all_handled.set()

    attributes = alpc.PortAttributes(max_queued_datagrams=WINDOW)
    with alpc.create_port("svc.q9.ordered", attributes, config=config) as port:
        completion = CompletionPort(port, handler, max_workers=4, ordered=True)
        _run(completion, port, spawn, runtime_dir, release, handled, all_handled, total)


def test_an_ordered_async_pool_keeps_a_fast_clients_datagrams_within_its_window(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    release, all_handled = threading.Event(), threading.Event()
    handled: list[bytes] = []
    total: list[int] = []

    async def handler(message: alpc.Message) -> None:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 60)
        handled.append(bytes(message.data))
        if total and len(handled) == total[0]:
            all_handled.set()

    attributes = alpc.PortAttributes(max_queued_datagrams=WINDOW)
    with alpc.create_port("svc.q9.ordered.async", attributes, config=config) as port:
        completion = CompletionPort(port, handler, max_workers=4, ordered=True)
        _run(completion, port, spawn, runtime_dir, release, handled, all_handled, total)


def _run(completion: CompletionPort, port: alpc.ConnectionPort, spawn: Any, runtime_dir: Path,
         release: threading.Event, handled: list[bytes], all_handled: threading.Event, total: list[int]) -> None:
    """Flood ``port`` from a client process while the handler blocks; check what the pool held."""
    serving = threading.Thread(target=completion.serve)
    serving.start()
    client = spawn.argv([sys.executable, str(PEERS), "client", port.name, "--runtime-dir", str(runtime_dir)])
    try:
        client.expect("READY")
        client.send(f"flood {FLOOD} 1")
        sent = int(client.expect("FLOODED", timeout=60)[0])
        held = _held(completion, port)
        assert sent < FLOOD, "the client was never held back: the server took every datagram it sent"
        assert sent <= WINDOW + 1, f"{sent} datagrams went out against a window of {WINDOW}"
        assert held <= WINDOW, f"{held} datagrams of one client queued past its window of {WINDOW}"
        total.append(sent)
        release.set()
        assert all_handled.wait(30), f"{len(handled)} of {sent} datagrams handled"
        assert handled == [str(i).encode() for i in range(sent)]  # in order, none lost
        client.send("quit")
        client.expect("BYE")
    finally:
        release.set()
        completion.stop()
        serving.join(10)


def test_a_client_gone_while_its_turn_is_out_leaves_the_waits_of_the_pool_alone(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    """Its next messages wait in its inbox behind the one being handled, and so does the notice
    of its end: its socket, at EOF, must not keep waking the pool's wait() (which then never
    timed out, and never saw stop()) for as long as the handler runs."""
    release, entered = threading.Event(), threading.Event()
    handled: list[bytes] = []

    def handler(message: alpc.Message) -> None:
        entered.set()
        release.wait(60)
        handled.append(bytes(message.data))

    attributes = alpc.PortAttributes(max_queued_datagrams=WINDOW)
    with alpc.create_port("svc.q9.ordered.gone", attributes, config=config) as port:
        completion = CompletionPort(port, handler, max_workers=2, ordered=True)
        serving = threading.Thread(target=completion.serve)
        serving.start()
        client = spawn.argv([sys.executable, str(PEERS), "client", port.name, "--runtime-dir", str(runtime_dir)])
        try:
            client.expect("READY")
            client.send("flood 3 5")
            assert client.expect("FLOODED") == ["3"]
            assert entered.wait(10)
            client.send("quit")
            client.expect("BYE")
            assert client.proc.wait(10) == 0
            completion.stop()
            # Every pool thread but the one in the handler leaves its wait within a tick or two.
            deadline = time.monotonic() + 5
            while (completion._leader.locked() or completion._followers) and time.monotonic() < deadline:
                release.wait(0.01)
            assert not completion._leader.locked(), "a pool thread never came back from wait()"
            release.set()
            serving.join(10)
            assert not serving.is_alive()
            assert handled == [b"0", b"1", b"2"]
        finally:
            release.set()
            completion.stop()
            serving.join(10)

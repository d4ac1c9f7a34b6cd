"""The runtime's own frames never make a caller wait behind another thread's blocked send.

``receive(timeout)`` owes the peer a credit once the application took enough datagrams; while
another thread's send holds the send lock, blocked on a peer that reads nothing, that credit
must stay owed for the next write rather than keep ``receive`` waiting for the other thread's
whole timeout.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from local_pairs import fill_socket

import alpc

PEERS = Path(__file__).resolve().parent / "grant_late_peers.py"
COUNT = 400  # past the credit point (a quarter of the default window of 1024)


@pytest.mark.timeout(60)
def test_receive_does_not_wait_for_another_threads_blocked_send(
        broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(PEERS), "deaf-sender", "svc.grantlate.lock", "--runtime-dir",
                         str(runtime_dir), "--count", str(COUNT)])
    server.expect("READY")
    with alpc.connect("svc.grantlate.lock", config=config, timeout=5) as comm:
        server.expect("SENT")
        fill_socket(comm, 16384, 0.05)
        outcome: list[BaseException | None] = []

        def blocked_send() -> None:
            try:
                comm.send(b"d" * 16384, timeout=4)
                outcome.append(None)
            except alpc.AlpcError as exc:
                outcome.append(exc)

        sender = threading.Thread(target=blocked_send)
        sender.start()
        held = threading.Event()
        while not held.is_set() and sender.is_alive():  # until the sender holds the send lock
            if comm._send_lock.acquire(blocking=False):
                comm._send_lock.release()
                held.wait(0.001)
            else:
                held.set()
        assert held.is_set(), outcome
        try:
            for taken in range(COUNT):
                started = time.monotonic()
                message = comm.receive(timeout=0.5)
                waited = time.monotonic() - started
                assert waited < 1.0, f"receive(timeout=0.5) #{taken} waited {waited:.1f}s (another thread sends)"
                assert message.data == b"x"
            assert sender.is_alive(), "the sender's write ended before the receives: nothing was proven"
        finally:
            server.send("bye")
            sender.join(10)

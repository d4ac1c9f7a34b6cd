"""Stopping a CompletionPort whose pool threads are stuck in handlers: serve() returns within
one bounded wait, not one such wait per blocked thread.

The client is in this process (its requests cross a real socket to the port); the handlers
report on a queue when they block, so the test orders every step with handshakes, no sleeps.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

import alpc
import alpc.completion

pytestmark = pytest.mark.timeout(60)

BLOCKED = 4
# What serve() may wait for its stuck pool in this test (the module's bound, made short).
JOIN_BOUND = 1.0


def test_serve_returns_within_one_bound_however_many_handlers_are_stuck(broker, config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """BLOCKED pool threads sit in a handler that does not return; stop(): serve() returned
    only after waiting JOIN_BOUND for each of them in turn (BLOCKED * JOIN_BOUND seconds: 20 s
    for four with the default bound), instead of within one bound for the whole pool."""
    monkeypatch.setattr(alpc.completion, "_JOIN_TIMEOUT", JOIN_BOUND)
    release = threading.Event()
    seen: queue.Queue[str] = queue.Queue()
    serving_thread: list[threading.Thread] = []

    def handler(message: alpc.Message) -> bytes:
        if threading.current_thread() is serving_thread[0]:
            seen.put("main")
            return b"main"  # serve()'s own thread must stay free to return
        seen.put("blocked")
        release.wait(30)
        return b"late"

    with alpc.create_port("completion.stop.bound", config=config) as port:
        completion = alpc.CompletionPort(port, handler, max_workers=BLOCKED + 1, idle_timeout=60)
        thread = threading.Thread(target=completion.serve, kwargs={"timeout": 60}, daemon=True)
        serving_thread.append(thread)
        thread.start()
        try:
            with alpc.connect("completion.stop.bound", config=config, timeout=10) as comm:
                pending = []
                blocked = 0
                for _ in range(100):
                    if blocked == BLOCKED:
                        break
                    pending.append(comm.start_request(b"x", timeout=30))
                    blocked += seen.get(timeout=10) == "blocked"
                assert blocked == BLOCKED, "the pool never had every extra thread stuck"
                started = time.monotonic()
                completion.stop()
                thread.join(BLOCKED * JOIN_BOUND + 10)
                took = time.monotonic() - started
                assert not thread.is_alive()
                assert took < JOIN_BOUND + 1.0, (
                    f"serve() took {took:.1f}s to return after stop() with {BLOCKED} stuck handlers")
                release.set()
                for request in pending:
                    request.result(timeout=10)
        finally:
            release.set()
            completion.stop()
            thread.join(30)
            for worker in list(completion._threads):
                worker.join(10)

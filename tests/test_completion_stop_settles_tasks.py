"""CompletionPort.stop() while an async handler runs.

serve()'s shutdown cancelled the handler tasks' futures (each cancel reaches its task through a
callback scheduled on the private loop), then at once scheduled ``loop.stop()`` and closed the
loop once it had stopped. The loop stopped after the iteration that ran those callbacks, before
any task took its CancelledError: every handler still running was left pending on a closed
loop ("Task was destroyed but it is pending!" when collected), its ``finally`` / ``async with``
cleanup never run on the loop (at best at garbage collection, on whatever thread, with no loop
to await on), and its slot never given back. README: "After ``stop()``, ``serve()`` waits at
most 5 s in all for handlers still running". Found by a stress loop of stop() with async
handlers in flight (every round left tasks pending).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading

import pytest
from background import Background  # tests/ is on sys.path

import alpc

pytestmark = pytest.mark.timeout(60)


def test_stop_lets_a_running_async_handler_end_on_the_loop(broker: alpc.Broker, config: alpc.Config,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    name = "close.race.completion.stop"
    port = alpc.create_port(name, config=config)
    running = threading.Event()
    ended: list[str] = []

    async def handler(message: alpc.Message) -> bytes:
        running.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            ended.append(threading.current_thread().name)  # on the loop, not at garbage collection
        return b""

    completion = alpc.CompletionPort(port, handler)

    def call() -> bytes:
        with alpc.connect(name, config=config, timeout=10) as client:
            return client.request(b"x", timeout=20).data

    serving = Background(lambda: completion.serve(timeout=30))
    calling = Background(call)
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            assert running.wait(10)
            completion.stop()
            serving.join(20)
            assert not serving.is_alive()
            assert serving.outcomes == [None]
            # The handler took its cancellation on the loop, its cleanup done, before serve() returned.
            assert ended == ["alpc-completion-loop"]
            gc.collect()
            assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
    finally:
        completion.stop()
        serving.join(20)
        port.close()
        calling.join(20)
    (outcome,) = calling.outcomes
    # The handler stop() cancelled never replied: its request, dropped, was answered by the runtime.
    assert isinstance(outcome, alpc.Unanswered), outcome

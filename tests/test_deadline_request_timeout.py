"""A request's timeout bounds the whole call, also when the request carries a deadline.

``request(data, timeout, deadline=...)`` sent through ``start_request`` (whose send may wait
for the peer's flow window for up to ``timeout``) and then waited ``result(timeout)``: a fresh
``timeout`` for the reply, so the call could last nearly twice its timeout. Without a deadline
the same call keeps to one.
"""

from __future__ import annotations

import threading
import time

import pytest

import alpc

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 1.0


def test_a_request_with_a_deadline_that_waited_for_the_window_still_ends_at_its_timeout(
        broker: alpc.Broker, config: alpc.Config) -> None:
    attributes = alpc.PortAttributes(max_pending_requests=1)
    with alpc.create_port("svc.cancel.window", attributes, config=config) as port:
        connected: list[alpc.CommunicationPort] = []
        connector = threading.Thread(target=lambda: connected.append(alpc.connect("svc.cancel.window",
                                                                                  config=config, timeout=10)))
        connector.start()
        server = port.listen(timeout=10).accept()
        connector.join(10)
        (client,) = connected
        with client, server:
            first = client.start_request(b"first", timeout=10)
            held = server.receive(timeout=10)  # the window (one request) is full until it is answered
            in_window_wait = threading.Event()
            await_window = client._await_window

            def noted(*args: object) -> None:
                in_window_wait.set()
                await_window(*args)  # type: ignore[arg-type]

            client._await_window = noted  # type: ignore[method-assign]
            outcome: list[tuple[str, float]] = []

            def call() -> None:
                started = time.monotonic()
                try:
                    client.request(b"second", timeout=TIMEOUT, deadline=started + 100)
                    outcome.append(("reply", time.monotonic() - started))
                except alpc.Timeout as exc:
                    outcome.append((type(exc).__name__, time.monotonic() - started))

            caller = threading.Thread(target=call)
            started = time.monotonic()
            caller.start()
            assert in_window_wait.wait(10)
            # Most of the timeout goes to waiting for the window (time is what is under test).
            threading.Event().wait(max(0.0, started + 0.6 * TIMEOUT - time.monotonic()))
            held.reply(b"")
            second = server.receive(timeout=10)  # sent; never answered
            assert second.data == b"second"
            caller.join(10)
            assert first.result(10).data == b""
            ((kind, took),) = outcome
            assert kind == "Timeout"
            assert took < 1.3 * TIMEOUT, f"request(timeout={TIMEOUT}) lasted {took:.2f} s"

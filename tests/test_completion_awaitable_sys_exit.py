"""sys.exit() in an awaitable the completion port resolves on its private loop fails only that call.

A plain handler may return an awaitable (a lambda around an async def) and ``on_connect`` may be
an ``async def``: ``_resolve`` runs it on the private event loop while the calling pool thread
waits. A ``SystemExit`` raised there left the task and ended ``run_forever`` (asyncio re-raises
SystemExit out of the loop), so the loop thread was gone, the waiting thread waited for good (its
request never answered, or ``serve()`` itself stuck in an async pool's accept) and every later
awaitable hung too. It is now the failure of that call only, as the handler's own SystemExit is.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Awaitable
from typing import Any

import pytest

import alpc
from alpc.completion import CompletionPort

pytestmark = pytest.mark.timeout(60)


async def _work(data: bytes) -> bytes:
    if data == b"exit":
        sys.exit("no such option")
    return b"pong"


def _handle(message: alpc.Message) -> Awaitable[bytes]:
    return _work(bytes(message.data))


def test_an_awaitable_of_a_plain_handler_calling_sys_exit_fails_only_its_request(
        broker: alpc.Broker, config: alpc.Config) -> None:
    name = "zz.cport.resolve.exit"
    with alpc.create_port(name, config=config) as port:
        serving = CompletionPort(port, _handle, max_workers=2)
        thread = threading.Thread(target=serving.serve, daemon=True)
        thread.start()
        try:
            with alpc.connect(name, config=config, timeout=10) as client:
                # Unfixed: Timeout, the loop that ran it is gone and its pool thread waits for good.
                assert bytes(client.request(b"exit", timeout=5).data) == b""
                assert bytes(client.request(b"ping", timeout=5).data) == b"pong"
        finally:
            serving.stop()
            thread.join(10)
    assert not thread.is_alive()


def test_an_async_on_connect_calling_sys_exit_refuses_only_that_client(
        broker: alpc.Broker, config: alpc.Config) -> None:
    name = "zz.cport.connect.exit"
    seen: list[bytes] = []

    async def on_connect(request: Any) -> bool:
        seen.append(bytes(request.data))
        if bytes(request.data) == b"exit":
            sys.exit("no such option")
        return True

    async def handle(message: alpc.Message) -> bytes:
        return b"pong"

    with alpc.create_port(name, config=config) as port:
        serving = CompletionPort(port, handle, on_connect=on_connect)
        thread = threading.Thread(target=serving.serve, daemon=True)
        thread.start()
        try:
            with pytest.raises(alpc.AlpcError):
                alpc.connect(name, b"exit", config=config, timeout=5).close()
            # Unfixed: the loop is gone and serve() waits for good on the first on_connect.
            with alpc.connect(name, b"ok", config=config, timeout=5) as client:
                assert bytes(client.request(b"ping", timeout=5).data) == b"pong"
        finally:
            serving.stop()
            thread.join(10)
        assert not thread.is_alive(), "serve() never returned"
    assert seen == [b"exit", b"ok"]

"""A CompletionPort handler that calls sys.exit() fails only its own request.

``sys.exit()`` in a thread ends that thread, and in an asyncio task it ends the event loop:
a handler's ``SystemExit`` (argparse's answer to a bad option, a script's handler calling
``sys.exit``) ended the pool thread or ``serve()`` itself (sync handler), or the completion
port's private loop (async handler), with its request unanswered, so the client waited its
whole timeout, and every later message of that client (``ordered``), or of every client (the
loop gone), was never handled. The RPC layer already counts a handler's SystemExit as the
failure of its own call; the completion port now answers it as any failed handler (logged,
empty reply) and serves on.
"""

from __future__ import annotations

import sys
import threading

import pytest

import alpc
from alpc.completion import CompletionPort

pytestmark = pytest.mark.timeout(60)


def _handle(message: alpc.Message) -> bytes:
    if bytes(message.data) == b"exit":
        sys.exit("no such option")
    return b"pong"


async def _handle_async(message: alpc.Message) -> bytes:
    return _handle(message)


@pytest.mark.parametrize("handler", [_handle, _handle_async], ids=["sync", "async"])
def test_a_handler_calling_sys_exit_fails_only_its_own_request(handler: object, broker: alpc.Broker,
                                                               config: alpc.Config) -> None:
    name = f"zz.exit.sysexit.{getattr(handler, '__name__', 'h')}"
    with alpc.create_port(name, config=config) as port:
        serving = CompletionPort(port, handler, ordered=True)  # type: ignore[arg-type]
        thread = threading.Thread(target=serving.serve, daemon=True)
        thread.start()
        try:
            with alpc.connect(name, config=config, timeout=10) as client:
                # Unfixed: Timeout, no reply ever comes (the thread or the loop that ran it is gone).
                failed = client.request(b"exit", timeout=10)
                assert bytes(failed.data) == b""  # as for a handler that raised any other error
                assert bytes(client.request(b"ping", timeout=10).data) == b"pong"
        finally:
            serving.stop()
            thread.join(10)
    assert not thread.is_alive()

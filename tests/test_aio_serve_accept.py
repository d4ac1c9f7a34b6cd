"""``AsyncConnectionPort.serve(accept=...)`` with an ``accept`` that is async or raises, on the
stock loop and uvloop, against real client processes.

An async ``accept`` was called and its coroutine's truth taken (never awaited): every client
was let in, those it meant to refuse included. An ``accept`` that raised ended serve() itself:
every connected client's task was cancelled and the client being judged was never answered.
CompletionPort's ``on_connect`` refuses only that client and serves on; so does this now.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from async_steps import LOOPS, in_thread, run_on

import alpc
from alpc import aio

PEERS = Path(__file__).resolve().parent / "aio_misuse_peers.py"

pytestmark = pytest.mark.timeout(60)


def upper(message: alpc.Message) -> bytes:
    return bytes(message.data).upper()


async def refuse_async(request: aio.AsyncConnectionRequest) -> bool:
    await asyncio.sleep(0)  # handshake-free: a real suspension point, as a lookup would have
    return request.data != b"intruder"


def refuse_raising(request: aio.AsyncConnectionRequest) -> bool:
    if request.data == b"intruder":
        raise ValueError("no such account")
    return True


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("accept", [refuse_async, refuse_raising], ids=["async", "raising"])
def test_serve_accept_refuses_only_that_client(loop: str, accept: Callable[..., Any], broker: alpc.Broker,
                                               config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    name = f"svc.aio.accept.{loop}.{accept.__name__}"

    def client(data: str) -> Any:
        return spawn.argv([sys.executable, str(PEERS), "client", name, "--runtime-dir", str(runtime_dir),
                           "--data", data])

    async def main() -> None:
        port = await aio.create_port(name, config=config, timeout=10)
        serving = asyncio.create_task(port.serve(upper, accept=accept))
        try:
            friend = client("friend")
            assert await in_thread(friend.expect, "REPLY") == ["HELLO"]
            intruder = client("intruder")
            assert await in_thread(intruder.expect, "") == ["REJECTED", "refused"]
            late = client("late")
            assert await in_thread(late.expect, "REPLY") == ["HELLO"]
            assert not serving.done()
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            await port.close()

    run_on(loop, main)

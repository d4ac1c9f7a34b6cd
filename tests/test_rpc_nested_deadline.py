"""A call whose deadline runs out inside its handler's nested call: the caller gets a Timeout.

Calls a handler makes inherit its caller's deadline, so a nested call still waiting at
that deadline raises alpc.Timeout in the handler. That is the caller's own time running
out, and the caller must see it as such (DeadlineExceeded, a Timeout), not as a RemoteError
naming alpc.errors.Timeout, which ``except alpc.Timeout`` does not catch.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rpc_deadline_peers import Relay, Sink

import alpc
from alpc import rpc
from alpc.errors import DeadlineExceeded, RemoteError
from alpc.rpc.codec import Codec
from alpc.rpc.dispatch import Dispatcher, ObjectTable
from alpc.security import PeerCred

PEERS = str(Path(__file__).resolve().parent / "rpc_deadline_peers.py")
NAME = "svc.rpcx-deadline"


class Held(Sink):
    """Its take() returns only once the server has answered the call that made it."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def take(self, data: Any) -> Any:
        # The server's nested call (this one) ran out of the inherited deadline, and the
        # server's answer to the outer call is written: only then does this callback return.
        self.server.expect("NESTED_TIMEOUT")
        self.server.expect("REPLIED")
        return b"late"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [10, 70_000])
def test_a_nested_call_past_the_inherited_deadline_is_the_callers_timeout(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, size: int) -> None:
    server = spawn.argv([sys.executable, PEERS, "server", NAME, "--runtime-dir", str(runtime_dir)])
    server.expect("READY")
    with rpc.connect(Relay, NAME, config=config, timeout=10) as client:
        started = time.monotonic()
        with pytest.raises(alpc.Timeout) as caught:
            client.with_timeout(0.5).relay(Held(server), b"d" * size)
        assert isinstance(caught.value, DeadlineExceeded) and not isinstance(caught.value, RemoteError)
        assert time.monotonic() - started < 10
        assert client.proxy.size(b"x" * size) == size  # the connection is fine afterwards


class Waiting(rpc.Interface, name="test.waiting"):
    @rpc.method
    def wait(self, why: str) -> None: ...


class WaitingImpl(Waiting):
    def __init__(self) -> None:
        self.ran = threading.Event()

    def wait(self, why: str) -> None:
        if why == "deadline":
            # As a nested call does when the inherited deadline passes while it waits.
            deadline = rpc.current_call().deadline
            assert deadline is not None
            while time.monotonic() < deadline:
                time.sleep(0.001)  # handshake-free: the deadline itself is what is waited for
            raise alpc.Timeout("timed out waiting for the reply")
        raise alpc.Timeout("the handler's own wait, before any deadline")


def test_only_a_timeout_at_the_deadline_becomes_deadline_exceeded() -> None:
    codec = Codec()
    dispatcher = Dispatcher(codec, ObjectTable(WaitingImpl()), caller=PeerCred(1, 0, 0))
    soon = time.monotonic() + 0.05
    for kwargs in (None, {"why": "deadline"}):  # the fast path and the general one
        args = ["deadline"] if kwargs is None else []
        payload, _ = codec.encode_call(0, "wait", args, kwargs, soon)
        reply = dispatcher.handle(payload if isinstance(payload, bytes) else b"".join(payload))
        assert reply is not None
        with pytest.raises(DeadlineExceeded):
            codec.result(reply if isinstance(reply, bytes) else b"".join(reply))
    # A Timeout of the handler's own, with time left: the handler's failure, as before.
    payload, _ = codec.encode_call(0, "wait", ["own"], None, time.monotonic() + 60)
    reply = dispatcher.handle(payload if isinstance(payload, bytes) else b"".join(payload))
    assert reply is not None
    with pytest.raises(RemoteError):
        codec.result(reply if isinstance(reply, bytes) else b"".join(reply))


class AsyncWaitingImpl(Waiting):
    async def wait(self, why: str) -> None:
        deadline = rpc.current_call().deadline
        assert deadline is not None
        while time.monotonic() < deadline:
            await asyncio.sleep(0.001)  # handshake-free: the deadline itself is what is waited for
        raise alpc.Timeout("timed out waiting for the reply")


def test_an_async_handlers_timeout_at_the_deadline_becomes_deadline_exceeded() -> None:
    codec = Codec()
    dispatcher = Dispatcher(codec, ObjectTable(AsyncWaitingImpl()), caller=PeerCred(1, 0, 0))
    payload, _ = codec.encode_call(0, "wait", ["deadline"], None, time.monotonic() + 0.05)
    prepared = dispatcher.prepare(payload if isinstance(payload, bytes) else b"".join(payload))
    assert not isinstance(prepared, bytes)
    reply = asyncio.run(dispatcher.run_async(prepared))
    assert reply is not None
    with pytest.raises(DeadlineExceeded):
        codec.result(reply if isinstance(reply, bytes) else b"".join(reply))

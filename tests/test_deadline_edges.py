"""Deadlines end to end: a refused deadline costs nothing, and an expired request is never handled.

The server is a real process (tests/peers.py) or the test's own completion port serving a real
client process (tests/cancel_client_peers.py); every step is ordered by a line handshake.
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
from alpc import aio

PEERS = Path(__file__).resolve().parent / "cancel_client_peers.py"
BIG = b"section body " * 400  # past the inline threshold: the body goes through a section

pytestmark = pytest.mark.timeout(60)


# -- a deadline refused before anything is sent -------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), "soon"], ids=["nan", "str"])
def test_a_refused_deadline_on_a_section_request_leaves_the_connection_usable(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, bad: object) -> None:
    """The first body of a connection announces its section; a deadline refused after the pool
    counted that announcement as made left the next message naming a section the server never
    saw: the server dropped the connection (protocol error) and the client got PeerGone."""
    server = spawn("server", "svc.cancel.bad")
    server.expect("READY")
    with alpc.connect("svc.cancel.bad", config=config, timeout=10) as comm:
        server.expect("ACCEPTED")
        with pytest.raises((ValueError, TypeError)):
            comm.start_request(BIG, deadline=bad)  # type: ignore[arg-type]
        assert comm.request(BIG, timeout=10).data == BIG.upper()


def test_a_refused_deadline_on_an_async_section_request_leaves_the_connection_usable(
        broker: alpc.Broker, config: alpc.Config, spawn: Any) -> None:
    server = spawn("server", "svc.cancel.abad")
    server.expect("READY")

    async def main() -> None:
        async with await aio.connect("svc.cancel.abad", config=config, timeout=10) as comm:
            with pytest.raises((ValueError, TypeError)):
                await comm.request(BIG, timeout=10, deadline=float("nan"))
            assert (await comm.request(BIG, timeout=10)).data == BIG.upper()

    asyncio.run(main())



@pytest.mark.parametrize("body", [b"small", BIG], ids=["inline", "section"])
def test_a_deadline_of_minus_infinity_is_a_deadline_long_past(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, body: bytes) -> None:
    """Any deadline before now is DeadlineExceeded (+inf is "never"); -inf raised the bare
    OverflowError of int(-inf) from deep in the send."""
    server = spawn("server", "svc.cancel.past")
    server.expect("READY")
    with alpc.connect("svc.cancel.past", config=config, timeout=10) as comm:
        server.expect("ACCEPTED")
        with pytest.raises(alpc.DeadlineExceeded):
            comm.request(body, timeout=10, deadline=float("-inf"))
        with pytest.raises(alpc.DeadlineExceeded):
            comm.start_request(body, deadline=float("-inf")).result(10)

        async def main() -> None:
            async with await aio.connect("svc.cancel.past", config=config, timeout=10) as acomm:
                with pytest.raises(alpc.DeadlineExceeded):
                    await acomm.request(body, timeout=10, deadline=float("-inf"))
                assert (await acomm.request(body, timeout=10)).data == body.upper()

        asyncio.run(main())
        assert comm.request(body, timeout=10).data == body.upper()

# -- a completion port never hands out a request whose deadline passed in its queue ----------


def _past(deadline: float) -> None:
    """Return once ``deadline`` (CLOCK_MONOTONIC, shared with the peer) is behind us: the
    condition under test is the passing of time itself, so this waits for exactly that."""
    while time.monotonic() <= deadline:
        threading.Event().wait(max(0.0, deadline - time.monotonic()) + 0.001)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_ordered_completion_port_never_runs_a_request_whose_deadline_passed_in_its_queue(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path, kind: str) -> None:
    """ordered=True queued a client's second request behind its first inside the completion
    port, where the runtime's own deadline check (at take time) no longer saw it: the handler
    ran it after its deadline and its reply reached a client that was promised
    DeadlineExceeded (and a client that never waits is never told at all)."""
    seen: list[bytes] = []
    entered, gate = threading.Event(), threading.Event()

    def blocking(message: alpc.Message) -> bytes:
        seen.append(message.data)
        if message.data == b"block":
            entered.set()
            gate.wait(30)
        return message.data.upper()

    async def awaiting(message: alpc.Message) -> bytes:
        seen.append(message.data)
        if message.data == b"block":
            entered.set()
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, 30)
        return message.data.upper()

    handler = blocking if kind == "sync" else awaiting
    with alpc.create_port("svc.cancel.ordered", config=config) as port:
        completion = alpc.CompletionPort(port, handler, ordered=True, max_workers=2)
        serving = threading.Thread(target=completion.serve)
        serving.start()
        try:
            client = spawn.argv([sys.executable, str(PEERS), "client", "svc.cancel.ordered",
                                 "--runtime-dir", str(runtime_dir)])
            client.expect("READY")
            client.send("start block")
            client.expect("STARTED block")
            assert entered.wait(10)
            client.send("start late 2.0")
            deadline = float(client.expect("STARTED late")[0])
            client.send("ping")
            client.expect("PONG")
            # "late" was read; now it waits for its turn in the client's inbox, behind "block".
            for _ in range(1000):
                if any(comm.queue_depth for comm in list(port._connections)):
                    break
                threading.Event().wait(0.005)
            assert any(comm.queue_depth for comm in list(port._connections)), \
                "the second request never waited for its turn"
            _past(deadline)
            gate.set()
            client.send("wait block 10")
            assert client.expect("REPLY block") == ["BLOCK"]
            client.send("start after")
            client.expect("STARTED after")
            client.send("wait after 10")  # ordered: handled after "late" was (or was not)
            assert client.expect("REPLY after") == ["AFTER"]
            client.send("wait late 10")
            assert client.expect("") == ["DEADLINE", "late"]
            assert seen == [b"block", b"after"]
            client.send("quit")
            client.expect("BYE")
        finally:
            gate.set()
            completion.stop()
            serving.join(10)

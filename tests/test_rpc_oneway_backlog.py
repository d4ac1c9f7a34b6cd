"""The one-way calls an RPC server holds for one client while an earlier one runs: bounded by
the port's window on rpc.aio.Server too, never run past their deadline, never stranded.

A client's one-way calls run one at a time, in the order sent, so the later ones wait in server
memory for their turn. The asyncio server let up to ``max_tasks`` (1024) of them wait, whatever
the port's ``max_queued_datagrams``; it ran a call whose deadline passed while it waited; and on
the blocking server a one-way handler raising a BaseException that is no Exception (a
KeyboardInterrupt) left the calls queued behind it unrun until the client sent another one-way
call. Servers and clients are real processes (tests/rpc_oneway_peers.py,
tests/window_flood_peers.py), ordered by line handshakes and by a request's answer (a connection
is read in order: a request answered was received after every call sent before it).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from async_steps import LOOPS, in_thread, run_on, until
from rpc_oneway_peers import Queue
from window_flood_peers import Sink

import alpc
from alpc import rpc

HERE = Path(__file__).resolve().parent
PEERS = str(HERE / "rpc_oneway_peers.py")
FLOOD_PEERS = str(HERE / "window_flood_peers.py")
NAME = "svc.rpc.oneway-backlog"
WINDOW = 8
FLOOD = 1200  # past max_tasks (1024): the unfixed asyncio server held the client back only there
# The drop of an expired call, as the server logs it (tests/rpc_oneway_peers.py logs at DEBUG).
DROPPED = "the deadline of test.rpc.oneway-queue.step passed before it started"

pytestmark = pytest.mark.timeout(90)


def start_server(spawn: Any, runtime_dir: Path, *options: str) -> Any:
    peer = spawn.argv([sys.executable, PEERS, NAME, "--runtime-dir", str(runtime_dir), *options])
    peer.expect("READY")
    return peer


def connect(config: alpc.Config) -> rpc.Client[Any]:
    return rpc.connect(Queue, NAME, config=config, timeout=10)


class AsyncSlowSink(Sink):
    """Its first one-way call holds the client's turn until the test releases it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.changed = asyncio.Condition()
        self.seen: list[int] = []

    async def put(self, index: int) -> None:  # type: ignore[override]
        await asyncio.wait_for(self.release.wait(), 60)
        async with self.changed:
            self.seen.append(index)
            self.changed.notify_all()


@pytest.mark.parametrize("loop", LOOPS)
def test_async_server_holds_a_clients_one_way_calls_within_the_ports_window(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path, loop: str) -> None:
    async def main() -> None:
        sink = AsyncSlowSink()
        attributes = alpc.PortAttributes(max_queued_datagrams=WINDOW)
        async with rpc.aio.Server(NAME, sink, attributes=attributes, config=config) as server:
            client = spawn.argv([sys.executable, FLOOD_PEERS, "rpc-client", NAME, "--runtime-dir", str(runtime_dir)])
            try:
                await in_thread(client.expect, "READY")
                client.send(f"flood {FLOOD} 1")
                sent = int((await in_thread(client.expect, "FLOODED", 60))[0])
                # The backlog (WINDOW) taken, running or waiting their turn, and the window's worth
                # unread in the inbox. Unbounded by the window, the server took up to max_tasks
                # (1024) of them.
                taken = sum(endpoint._oneways_taken for endpoint in server._connections)
                assert taken == WINDOW, f"{taken} one-way calls of one client taken by the server"
                assert sent <= 2 * WINDOW, f"{sent} one-way calls went out against a window of {WINDOW}"
                sink.release.set()
                # Calls that waited past their deadline (the 1 s each was sent with) are dropped;
                # the rest run in order, and the client is served again once they drained.
                client.send("flood 3 10")
                assert await in_thread(client.expect, "FLOODED") == ["3"]
                async with sink.changed:
                    await asyncio.wait_for(sink.changed.wait_for(lambda: sink.seen[-3:] == [0, 1, 2]), 30)
                assert sink.seen[:-3] == sorted(set(sink.seen[:-3])), sink.seen
                client.send("quit")
                await in_thread(client.expect, "BYE")
            finally:
                sink.release.set()

    run_on(loop, main)


@pytest.mark.parametrize("server", ["threads", "asyncio"])
def test_a_one_way_call_whose_deadline_passed_while_it_waited_never_runs(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, server: str) -> None:
    peer = start_server(spawn, runtime_dir, *(["--asyncio"] if server == "asyncio" else []))
    with connect(config) as client:
        client.proxy.hold("a")  # holds the client's turn until release()
        client.with_timeout(0.3).step("late")
        sent = time.monotonic()  # its deadline is 0.3 s after a moment before this one
        client.proxy.step("on time")
        # Received (see the module's docstring), waiting behind "a".
        assert client.proxy.log(1, 10.0) == ["hold a"]
        time.sleep(max(0.0, sent + 0.3 - time.monotonic()))  # handshake-free: the deadline under test must pass
        client.proxy.release()
        assert client.proxy.log(3, 10.0) == ["hold a", "released a", "on time"]
    peer.expect_stderr(DROPPED, timeout=10)


def test_calls_queued_behind_a_one_way_call_that_raised_keyboard_interrupt_still_run(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config) -> None:
    peer = start_server(spawn, runtime_dir, "--workers", "3")
    with connect(config) as client:
        client.proxy.hold("boom", True)  # raises KeyboardInterrupt once released
        client.proxy.step("after 1")
        client.proxy.step("after 2")
        assert client.proxy.log(1, 10.0) == ["hold boom"]  # the steps wait behind it
        client.proxy.release()
        # Nothing more from this client: the next pass of a worker runs them all the same.
        assert client.proxy.log(4, 10.0) == ["hold boom", "released boom", "after 1", "after 2"]
    peer.expect_stderr("KeyboardInterrupt: boom", timeout=10)


PAUSED_NAME = "svc.rpc.oneway-paused"
MAX_TASKS = 8


class Gate(rpc.Interface, name="test.rpc.oneway-paused", version=(1, 0)):
    @rpc.method(oneway=True)
    async def hold(self) -> None: ...

    @rpc.method(oneway=True)
    async def step(self) -> None: ...

    @rpc.method
    async def work(self, index: int) -> int: ...


class GateImpl(Gate):
    """hold() keeps the client's one-way turn, work() runs until the test opens its gate; work()
    counts how many of it run at once."""

    def __init__(self) -> None:
        self.oneways_go = asyncio.Event()
        self.work_go = asyncio.Event()
        self.changed = asyncio.Condition()
        self.started = 0
        self.running = 0
        self.peak = 0

    async def hold(self) -> None:
        await asyncio.wait_for(self.oneways_go.wait(), 60)

    async def step(self) -> None:
        pass

    async def work(self, index: int) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        async with self.changed:
            self.started += 1
            self.changed.notify_all()
        try:
            await asyncio.wait_for(self.work_go.wait(), 60)
        finally:
            self.running -= 1
        return index


def test_max_tasks_holds_while_the_one_way_backlog_holds_a_client_back(broker: alpc.Broker,
                                                                      config: alpc.Config) -> None:
    """Calls running while the one-way backlog holds a client's later messages in its window, and
    those the server takes once it drains, together stay within max_tasks. (When the server held a
    client back by cancelling its serve() and serving it again later, the new serve() counted its
    tasks from zero: 10 ran at once against 8.)"""
    async def main() -> None:
        impl = GateImpl()
        attributes = alpc.PortAttributes(max_queued_datagrams=2)  # a one-way backlog of 2
        async with rpc.aio.Server(PAUSED_NAME, impl, attributes=attributes, config=config,
                                  max_tasks=MAX_TASKS) as server:
            async with await rpc.aio.connect(Gate, PAUSED_NAME, config=config, timeout=10) as client:
                gate = client.proxy
                calls = [asyncio.ensure_future(gate.work(index)) for index in range(5)]
                try:
                    async with impl.changed:
                        await asyncio.wait_for(impl.changed.wait_for(lambda: impl.started == 5), 10)
                    # One-way calls: the first holds the turn, the second fills the backlog with
                    # it, and the third waits unread in the inbox, the later calls behind it.
                    for call in (gate.hold, gate.step, gate.step):
                        await call()
                    (endpoint,) = server._connections
                    inbox = endpoint.comm._core.inbox
                    await until(lambda: endpoint._oneways_taken == 2 and len(inbox) == 1, "the backlog full")
                    calls += [asyncio.ensure_future(gate.work(index)) for index in range(5, 10)]
                    await until(lambda: len(inbox) == 6, "the later calls read, held back")
                    impl.oneways_go.set()  # the one-way calls drain: the client is served again
                    async with impl.changed:
                        await asyncio.wait_for(impl.changed.wait_for(lambda: impl.started >= MAX_TASKS), 10)
                    running = len(endpoint.comm._handlers)
                    assert running <= MAX_TASKS, f"{running} handler tasks of one client against max_tasks {MAX_TASKS}"
                    impl.work_go.set()
                    assert await asyncio.wait_for(asyncio.gather(*calls), 10) == list(range(10))
                    assert impl.peak <= MAX_TASKS, f"{impl.peak} calls ran at once against max_tasks {MAX_TASKS}"
                finally:
                    impl.oneways_go.set()
                    impl.work_go.set()
                    await asyncio.gather(*calls, return_exceptions=True)

    run_on("asyncio", main)

"""The completion port's async pool and alpc.aio's reply under cancels and slot races.

Each test drives one interleaving with events and line handshakes with real client
processes (tests/completion_fault_peers.py); where the interleaving depends on
which thread wins a race, a hook forces one order the scheduler is free to pick.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from async_steps import in_thread, until

import alpc
from alpc import aio
from alpc.wire import MessageType

PEERS = Path(__file__).resolve().parent / "completion_fault_peers.py"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def client(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(role: str, name: str, *args: str, ready: bool = True):  # type: ignore[no-untyped-def]
        peer = spawn.argv([sys.executable, str(PEERS), role, name, "--runtime-dir", str(runtime_dir), *args])
        if ready:
            peer.expect("READY")
        return peer
    return start


# -- an instrumented completion port ------------------------------------------------------


class RacedSlots:
    """The async pool's slot semaphore, with one race decided: when the loop thread frees a
    slot while the dispatching thread waits for one, the dispatching thread takes it first
    (both orders are legal; this one is forced so the test is deterministic)."""

    def __init__(self, value: int, owner: Instrumented) -> None:
        self._sem = threading.BoundedSemaphore(value)
        self._owner = owner
        self._cond = threading.Condition()
        self._dispatcher_waiting = False
        self._dispatcher_took = 0
        self.dispatcher_blocked = threading.Event()
        self.loop_blocked = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        me = threading.current_thread()
        dispatcher = me is self._owner.dispatcher
        got = self._sem.acquire(blocking=False)
        if not got:
            if dispatcher:
                with self._cond:
                    self._dispatcher_waiting = True
                self.dispatcher_blocked.set()
            elif me is self._owner._loop_thread:
                self.loop_blocked.set()
            got = self._sem.acquire(timeout=timeout) if blocking else False
        if got and dispatcher:
            with self._cond:
                self._dispatcher_waiting = False
                self._dispatcher_took += 1
                self._cond.notify_all()
        return got

    def release(self) -> None:
        with self._cond:
            waiting, took = self._dispatcher_waiting, self._dispatcher_took
        self._sem.release()
        if waiting and threading.current_thread() is not self._owner.dispatcher:
            with self._cond:
                self._cond.wait_for(lambda: self._dispatcher_took > took, timeout=5)


class Instrumented(alpc.CompletionPort):
    """A CompletionPort that reports, per request tag, when the dispatcher took it and
    handed it on (queued or submitted); with ``raced``, its slots are RacedSlots."""

    def __init__(self, *args: Any, raced: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raced = raced
        self.dispatcher: threading.Thread | None = None
        self._events: dict[str, threading.Event] = {}
        self._events_lock = threading.Lock()

    def event(self, name: str) -> threading.Event:
        with self._events_lock:
            return self._events.setdefault(name, threading.Event())

    def serve(self, timeout: float | None = None) -> None:
        self.dispatcher = threading.current_thread()
        super().serve(timeout)

    def _start_loop(self) -> None:
        super()._start_loop()
        if self.raced:
            self._slots = RacedSlots(self.max_workers, self)  # type: ignore[assignment]

    def _dispatch(self, message: alpc.Message) -> None:
        tag = message.data.decode() if message.type is MessageType.REQUEST else ""
        super()._dispatch(message)
        if tag:
            self.event("dispatched " + tag).set()


def wait_event(event: threading.Event, what: str, timeout: float = 10) -> None:
    assert event.wait(timeout), f"never happened: {what}"


@contextlib.contextmanager
def serving(completion: alpc.CompletionPort):  # type: ignore[no-untyped-def]
    thread = threading.Thread(target=completion.serve, kwargs={"timeout": 60}, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        completion.stop()
        thread.join(15)
        assert not thread.is_alive(), "serve() did not return after stop()"


def finish(*peers: Any) -> None:
    for peer in peers:
        peer.send("quit")
        peer.expect("BYE")
        peer.proc.wait(10)


# -- the loop thread never waits for a slot the dispatcher took ---------------------------


def test_async_pool_serves_the_queued_message_when_the_dispatcher_takes_the_freed_slot(broker, config, client) -> None:  # type: ignore[no-untyped-def]
    """ordered=True, max_workers=1, async handler. Client A's A1 runs and A2 waits behind
    it; client B's B1 has the dispatching thread waiting for the one slot. A1 ends: its
    done-callback (_task_done, on the loop thread) frees the slot and submits A2, waiting
    for a slot on the loop thread. If the dispatcher takes the freed slot first (forced
    here), B1's task is queued on a loop whose thread is blocked in _task_done, so
    neither A2 nor B1 is ever answered (until stop() or a cancel)."""
    held: dict[str, asyncio.Future[None]] = {}
    running = threading.Event()

    async def handle(message: alpc.Message) -> bytes:
        tag = message.data.decode()
        if tag == "A1":
            held[tag] = asyncio.get_running_loop().create_future()
            running.set()
            await held[tag]
        return tag.lower().encode()

    with alpc.create_port("cp.stall", config=config) as port:
        completion = Instrumented(port, handle, max_workers=1, ordered=True, raced=True)
        with serving(completion):
            a = client("client", "cp.stall")
            b = client("client", "cp.stall")
            _queue_a2_behind_a1(a, running, completion)
            b.send("start B1")
            b.expect("STARTED")
            slots = completion._slots
            assert isinstance(slots, RacedSlots)
            wait_event(slots.dispatcher_blocked, "the dispatcher waiting for a slot for B1")
            assert completion._loop is not None
            completion._loop.call_soon_threadsafe(held["A1"].set_result, None)
            a.send("wait A1 10")
            assert a.expect("") == ["REPLY", "A1", "a1"]
            a.send("wait A2 5")
            b.send("wait B1 5")
            got = [a.expect(""), b.expect("")]
            loop_blocked = slots.loop_blocked.is_set()
            finish(a, b)
    assert got == [["REPLY", "A2", "a2"], ["REPLY", "B1", "b1"]], (
        got, f"loop thread blocked on a slot: {loop_blocked}")


# -- a cancelled handler keeps its slot until it has returned -------------------------------


def _cancel_aware_handler(record: dict[str, Any]):  # type: ignore[no-untyped-def]
    """An async handler that records which handlers run at once. A1 waits until cancelled,
    then cleans up (awaits) for up to 1 s, or until another handler starts."""
    active: set[str] = record.setdefault("active", set())
    overlaps: list[tuple[str, str]] = record.setdefault("overlaps", [])
    peak: list[int] = record.setdefault("peak", [0])
    held: dict[str, asyncio.Future[None]] = record.setdefault("held", {})
    running: threading.Event = record.setdefault("running", threading.Event())
    cleaning: threading.Event = record.setdefault("cleaning", threading.Event())

    async def handle(message: alpc.Message) -> bytes:
        tag = message.data.decode()
        overlaps.extend((tag, other) for other in sorted(active))
        active.add(tag)
        peak[0] = max(peak[0], len(active))
        try:
            cleanup = held.get("cleanup")
            if cleanup is not None and not cleanup.done():
                cleanup.set_result(None)
            if tag == "A1":
                loop = asyncio.get_running_loop()
                held[tag] = loop.create_future()
                running.set()
                try:
                    await held[tag]
                except asyncio.CancelledError:
                    held["cleanup"] = loop.create_future()
                    cleaning.set()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(held["cleanup"], 1.0)  # a bounded cleanup
                    raise
            return tag.lower().encode()
        finally:
            active.discard(tag)

    return handle


def _queue_a2_behind_a1(a: Any, running: threading.Event, completion: Instrumented) -> None:
    """Client ``a`` starts A1 and, once it runs, A2 (queued behind it: ordered)."""
    a.send("start A1")
    a.expect("STARTED")
    wait_event(running, "A1 running")
    a.send("start A2")
    a.expect("STARTED")
    a.send("ping")  # A2 waits in A's inbox, behind A1, once the port answers
    a.expect("PONG")


def _cancel_the_first_of_two(a: Any, running: threading.Event, completion: Instrumented,
                             wait_seconds: int) -> list[str]:
    """Client ``a`` starts A1, then A2 queued behind it, cancels A1 and waits for A2."""
    _queue_a2_behind_a1(a, running, completion)
    a.send("cancel A1")
    assert a.expect("CANCEL") == ["A1", "True"]
    a.send(f"wait A2 {wait_seconds}")
    reply: list[str] = a.expect("")
    finish(a)
    return reply


def test_async_pool_cancel_keeps_one_handler_per_client_when_ordered(broker, config, client) -> None:  # type: ignore[no-untyped-def]
    """ordered=True: client A cancels A1 while A2 waits behind it. The cancel cancels the
    concurrent future, whose done-callback (_task_done) starts A2 at once, while A1's task
    is still running (its CancelledError only now arrives, and it cleans up): two handlers
    of one client at once."""
    record: dict[str, Any] = {}
    handle = _cancel_aware_handler(record)
    with alpc.create_port("cp.order", config=config) as port:
        completion = Instrumented(port, handle, max_workers=2, ordered=True)
        with serving(completion):
            reply = _cancel_the_first_of_two(client("client", "cp.order"), record["running"], completion, 10)
    assert reply == ["REPLY", "A2", "a2"], reply
    assert record["overlaps"] == [], f"handlers running at once (started, still running): {record['overlaps']}"


def test_async_pool_cancel_keeps_at_most_max_workers_handlers(broker, config, client) -> None:  # type: ignore[no-untyped-def]
    """max_workers=1: client A cancels A1, whose handler cleans up after its CancelledError;
    meanwhile client B's B1 arrives. The cancel freed A1's slot already, so B1 starts while
    A1 still runs: two handlers on a pool of one."""
    record: dict[str, Any] = {}
    handle = _cancel_aware_handler(record)
    with alpc.create_port("cp.bound", config=config) as port:
        completion = Instrumented(port, handle, max_workers=1)
        with serving(completion):
            a = client("client", "cp.bound")
            b = client("client", "cp.bound")
            a.send("start A1")
            a.expect("STARTED")
            wait_event(record["running"], "A1 running")
            a.send("cancel A1")
            assert a.expect("CANCEL") == ["A1", "True"]
            wait_event(record["cleaning"], "A1 cleaning up after its CancelledError")
            b.send("start B1")
            b.expect("STARTED")
            b.send("wait B1 10")
            reply = b.expect("")
            finish(a, b)
    assert reply == ["REPLY", "B1", "b1"], reply
    assert record["peak"][0] <= 1, f"{record['peak'][0]} handlers at once on max_workers=1: {record['overlaps']}"


def test_sync_pool_cancel_keeps_one_handler_per_client_when_ordered(broker, config, client) -> None:  # type: ignore[no-untyped-def]
    """Control for the sync pool: the cancel only sets message.cancelled (_cancelled does
    nothing else for a plain handler), and A2 runs on A1's thread after A1 returns."""
    active: set[str] = set()
    overlaps: list[tuple[str, str]] = []
    lock = threading.Lock()
    running = threading.Event()
    second = threading.Event()
    saw_cancel: list[bool] = []

    def handle(message: alpc.Message) -> bytes:
        tag = message.data.decode()
        with lock:
            overlaps.extend((tag, other) for other in sorted(active))
            active.add(tag)
        if tag != "A1":
            second.set()
        try:
            if tag == "A1":
                running.set()
                stop = time.monotonic() + 10
                while not message.cancelled and time.monotonic() < stop:
                    time.sleep(0.005)  # handshake-free: a sync handler polls its cancel flag, as documented
                saw_cancel.append(message.cancelled)
                second.wait(1.0)  # a bounded cleanup, cut short if another handler starts
            return tag.lower().encode()
        finally:
            with lock:
                active.discard(tag)

    with alpc.create_port("cp.sync", config=config) as port:
        completion = Instrumented(port, handle, max_workers=2, ordered=True)
        with serving(completion):
            reply = _cancel_the_first_of_two(client("client", "cp.sync"), running, completion, 15)
    assert reply == ["REPLY", "A2", "a2"], reply
    assert saw_cancel == [True]
    assert overlaps == [], overlaps


# -- a reply with fds cancelled behind queued bytes loses nothing ---------------------------


def _cancelled_reply_behind_a_queue(config: alpc.Config, client: Any, name: str, with_fds: bool,
                                    reply_again: bool) -> tuple[list[str], list[str], object]:
    """An aio server whose write queue is not empty (its client reads nothing yet) queues a
    datagram Q with flush=False, then a task replies to the client's request R, and is
    cancelled at its first await. Then Z and END go out. Returns the datagrams the client
    saw (in order), what it got for R, and the outcome of a second reply to R."""

    async def main() -> tuple[list[str], list[str], object]:
        port = await aio.create_port(name, config=config, timeout=10)
        try:
            peer = client("lazy", name, "--quiet", "2", ready=False)
            comm = await (await port.listen(timeout=10)).accept()
            try:
                await in_thread(peer.expect, "READY")
                await in_thread(peer.expect, "SENT")
                request = await comm.receive(timeout=10)
                assert request.type is MessageType.REQUEST and request.data == b"R"
                comm._stream._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                for _ in range(100):
                    await comm.send(b"s" * 200, flush=False)  # 20 KB, more than the socket takes
                filling = asyncio.create_task(comm.flush(timeout=20))
                await until(lambda: bool(comm._unsent), "the write queue to hold bytes")
                await comm.send(b"Q", flush=False)  # owed: rides with the next write
                assert comm._core.owed
                r, w = os.pipe()
                try:
                    replying = asyncio.create_task(
                        comm.reply(request, b"r", timeout=20, fds=[r] if with_fds else ()))
                    await asyncio.sleep(0)  # handshake-free: one loop turn: the task runs to its first await
                    if replying.done():
                        replying.result()
                    assert not replying.done()
                    replying.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await replying
                finally:
                    os.close(r)
                    os.close(w)
                again: object = "not tried"
                second = None
                if reply_again:
                    second = asyncio.create_task(comm.reply(request, b"again", timeout=20))
                    await asyncio.sleep(0)  # handshake-free: one loop turn: it runs to its first await (or fails)

                async def tail() -> None:
                    await comm.send(b"Z", timeout=20)
                    await comm.send(b"END", timeout=20)

                tailing = asyncio.create_task(tail())
                peer.send("read")
                lines: list[str] = []
                while True:
                    words = await in_thread(peer.expect, "")
                    if words[0] == "DGRAM":
                        lines.append(words[1])
                        if words[1] == "END":
                            break
                    elif words[0] in ("QUIET", "GONE", "OTHER"):
                        lines.append(" ".join(words))
                        break
                answer = await in_thread(peer.expect, "")
                await asyncio.wait_for(filling, 20)
                await asyncio.wait_for(tailing, 20)
                if second is not None:
                    try:
                        await asyncio.wait_for(second, 20)
                        again = "sent"
                    except Exception as exc:  # the outcome is the evidence
                        again = exc
                await in_thread(peer.expect, "DONE")
                peer.send("quit")
                return lines, answer, again
            finally:
                await comm.close()
        finally:
            await port.close()

    return asyncio.run(main())


def test_aio_reply_with_fds_cancelled_behind_a_queue_keeps_owed_datagrams(broker, config, client) -> None:  # type: ignore[no-untyped-def]
    """reply(..., fds=...) with bytes already queued: _write takes core.take_owed() (the
    flush=False datagram Q, credits, releases), then awaits _drain for the fds. Cancelled
    there, the owed frames are dropped with the token that would restore them: the client
    sees Z but never Q."""
    lines, _, _ = _cancelled_reply_behind_a_queue(config, client, "cp.owed", with_fds=True, reply_again=False)
    assert lines == ["Q", "Z", "END"], lines


def test_aio_reply_with_fds_cancelled_behind_a_queue_can_be_replied_again(broker, config, client) -> None:  # type: ignore[no-untyped-def]
    """Same path: core.reply() already marked R answered and built its frame before _write
    awaited; cancelled there, that frame is dropped too. Nothing went out, yet R can no
    longer be answered (a second reply raises ValueError) and the client never gets one."""
    _, answer, again = _cancelled_reply_behind_a_queue(config, client, "cp.again", with_fds=True,
                                                       reply_again=True)
    assert again == "sent", again
    assert answer == ["REPLY", "again"], answer


def test_control_aio_reply_without_fds_cancelled_behind_a_queue_goes_out(broker, config, client) -> None:  # type: ignore[no-untyped-def]
    """Control: without fds, _write queues everything before its first await, so the
    cancelled reply and Q both go out."""
    lines, answer, _ = _cancelled_reply_behind_a_queue(config, client, "cp.nofds", with_fds=False, reply_again=False)
    assert lines == ["Q", "Z", "END"], lines
    assert answer == ["REPLY", "r"], answer


# -- a reply or an accept that fails ends only its own turn ----------------------------------


def _upper(message: alpc.Message) -> bytes:
    return message.data.upper()


async def _upper_async(message: alpc.Message) -> bytes:
    return message.data.upper()


@pytest.mark.parametrize("handler", [_upper, _upper_async], ids=["sync", "async"])
def test_a_reply_that_cannot_be_sent_at_all_ends_only_its_own_turn(broker, config, monkeypatch,  # type: ignore[no-untyped-def]
                                                                   handler) -> None:
    """The handler's reply and the fallback empty reply both raise (anything but
    ConnectionClosed): both are logged and serve() goes on; with ordered=True the same
    client's next request is still handled."""
    real_reply = alpc.CommunicationPort.reply

    def reply(self, message, data=b"", *args, **kwargs):  # type: ignore[no-untyped-def]
        if message.data == b"boom":
            raise RuntimeError("injected: this reply cannot be sent")
        return real_reply(self, message, data, *args, **kwargs)

    monkeypatch.setattr(alpc.CommunicationPort, "reply", reply)
    with alpc.create_port("cp.boom", config=config) as port, \
            alpc.CompletionPort(port, handler, ordered=True, max_workers=1) as completion, serving(completion):
        with alpc.connect("cp.boom", config=config, timeout=10) as comm:
            lost = comm.start_request(b"boom", timeout=10)
            assert comm.request(b"next", timeout=10).data == b"NEXT"
            with pytest.raises(alpc.Timeout):
                lost.result(timeout=0)  # its turn ended with no reply at all


def test_an_accept_that_fails_refuses_only_that_client(broker, config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """ConnectionRequest.accept() failing with an OSError (EMFILE: out of fds) or an AlpcError
    other than ConnectionClosed: that client is refused, and the loop serves the next one."""
    real_accept = alpc.ConnectionRequest.accept
    failures = [OSError(24, "Too many open files")]

    def accept(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()
        return real_accept(self, *args, **kwargs)

    monkeypatch.setattr(alpc.ConnectionRequest, "accept", accept)
    with alpc.create_port("cp.emfile", config=config) as port, \
            alpc.CompletionPort(port, _upper) as completion, serving(completion):
        with pytest.raises(alpc.ConnectionRejected):
            alpc.connect("cp.emfile", config=config, timeout=10)
        with alpc.connect("cp.emfile", config=config, timeout=10) as comm:
            assert comm.request(b"after", timeout=10).data == b"AFTER"

"""The Quick-LPC fast path (csrc/qlpc.c, alpc/qlpc.py) against a hostile peer and awkward
interleavings the other qlpc tests do not cover. Each docstring says what used to go wrong."""

from __future__ import annotations

import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from local_pairs import local_connection
from qlpc_harness import (
    CLIENT_SIDE,
    ENTRY,
    ID_BIT,
    REQUEST,
    SERVER_SIDE,
    STATE,
    TAIL,
    Pair,
    deadline,
    make_pair,
    native,
)

import alpc
from alpc import qlpc
from alpc._native import Q_CLOSED, quick_region_size

ST_FUTEX = 2


def in_thread(target, *args):  # type: ignore[no-untyped-def]
    result: list[object] = []

    def run() -> None:
        try:
            result.append(target(*args))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.result = result  # type: ignore[attr-defined]
    return thread


def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for a condition on shared state (a state change, not a guess at timing)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.0005)  # handshake-free: ring words in shared memory signal nothing to wait on


# -- stale replies keep a client's call past its deadline, and close() behind it --------


CPU = min(os.sched_getaffinity(0))
STOP_FLAG = 64  # a word of the region header nobody reads after the client's open

# A hostile server in its own process (no GIL shared with the test), pinned to CPU: it fills
# its ring with replies to a request nobody made (callback id ID_BIT|0x3FFFFFFF, which the
# client skips as late), then keeps its published tail a full ring ahead of the client's
# head, so the client never finds the ring empty.
FLOODER = r"""
import mmap, os, struct, sys
fd, slots, slot_size, cpu = map(int, sys.argv[1:])
os.sched_setaffinity(0, {cpu})
region = mmap.mmap(fd, 512 + 2 * slots * slot_size)
for i in range(slots):
    struct.pack_into("<IIIIIIQ", region, 512 + i * slot_size, 2, slot_size - 32, 0, 0x40000000 | 0x3FFFFFFF, 0, 0, 0)
words = memoryview(region).cast("I")   # whole-word stores (struct writes byte by byte)
tail, head, stop = (128 + 4) // 4, (256 + 8) // 4, 64 // 4
words[tail] = (words[head] + slots) & 0xFFFFFFFF
print("READY", flush=True)
while not words[stop]:
    for _ in range(500):
        words[tail] = (words[head] + slots) & 0xFFFFFFFF
words.release()
"""


def victim(target, *args):  # type: ignore[no-untyped-def]
    """target(*args) on the flooder's CPU at nice 19: a stand-in for a flooder written in C
    on a CPU of its own, which keeps up with the victim on any machine."""
    def run():  # type: ignore[no-untyped-def]
        os.sched_setaffinity(0, {CPU})
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return target(*args)
    return run


class StaleFlood:
    def __init__(self, pair: Pair) -> None:
        self.pair = pair

    def __enter__(self) -> StaleFlood:
        pair = self.pair
        self.process = subprocess.Popen(
            [sys.executable, "-c", FLOODER, str(pair.fd), str(pair.slots), str(pair.slot_size), str(CPU)],
            pass_fds=[pair.fd], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().split() == ["READY"]
        return self

    def __exit__(self, *exc: object) -> None:
        struct.pack_into("<I", self.pair.region, STOP_FLAG, 1)
        try:
            self.process.wait(10)
        finally:
            self.process.kill()
            self.process.wait()
            assert self.process.stdout is not None
            self.process.stdout.close()


@native
def test_stale_reply_flood_does_not_defeat_the_call_deadline() -> None:
    """qlpc.c receive(): a call skips replies to other ids in a loop that never looks at
    the deadline (wait_entry checks ready() before the deadline). A server that keeps
    stale replies coming holds the caller in C, GIL released, past its timeout."""
    with make_pair(slots=1024, slot_size=65536) as pair:
        with StaleFlood(pair):
            call = in_thread(victim(pair.client.call, b"x", 1, deadline(0.2)))
            call.join(3.0)
            stuck = call.is_alive()
            dropped = pair.client.info.dropped
        call.join(10)
        assert not call.is_alive()
        assert not stuck, f"call with a 0.2 s deadline still in C after 3 s ({dropped} stale replies dropped)"


@native
def test_stale_reply_flood_does_not_block_close() -> None:
    """Same loop: it never looks at `closing` either (ready() returns 1 before it does), so
    qlpc_close(), which waits for every call to leave, blocks as long as the flood lasts."""
    with make_pair(slots=1024, slot_size=65536) as pair:
        with StaleFlood(pair):
            call = in_thread(victim(pair.client.call, b"x", 1, -1))
            until(lambda: pair.client.info.dropped > 100)
            closer = in_thread(pair.client.close)
            closer.join(3.0)
            stuck = closer.is_alive()
        closer.join(10)
        call.join(10)
        assert not closer.is_alive() and not call.is_alive()
        assert not stuck, "close() blocked behind a call that skips stale replies"


# -- a reused ring request id escapes as ProtocolError instead of dropping the client ----


@contextmanager
def quick_connection(config: alpc.Config, name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        tuple[alpc.ConnectionPort, alpc.CommunicationPort, alpc.CommunicationPort, mmap.mmap]]:
    """An in-process server port offering the rings, an accepted connection and its client, and a
    Python mapping of the client's rings (a hostile client writes there)."""
    grabbed: list[mmap.mmap] = []
    original = qlpc.QuickLink.accept

    def accept(fd: int, slots: int, slot_size: int, *rest: object) -> qlpc.QuickLink:
        grabbed.append(mmap.mmap(fd, quick_region_size(slots, slot_size)))
        return original(fd, slots, slot_size, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(qlpc.QuickLink, "accept", accept)
    with local_connection(config, name, alpc.PortAttributes(quick_lpc=True)) as (port, server, client):
        try:
            assert client.quick and server.quick
            yield port, server, client, grabbed[0]
        finally:
            grabbed[0].close()


def publish_requests(region: mmap.mmap, ids: list[int], slots: int = 8, slot_size: int = 512) -> None:
    """What a hostile client writes: requests with the given ids, then its tail (whole words)."""
    words = memoryview(region).cast("I")
    try:
        tail = words[(CLIENT_SIDE + TAIL) // 4]
        for i, message_id in enumerate(ids):
            slot = 512 + slots * slot_size + ((tail + i) % slots) * slot_size
            ENTRY.pack_into(region, slot + 0, REQUEST, 1, message_id, 0, 0, 0, 0)
            region[slot + 32:slot + 33] = b"q"
        words[(CLIENT_SIDE + TAIL) // 4] = (tail + len(ids)) & 0xFFFFFFFF
    finally:
        words.release()


@native
def test_a_reused_ring_id_drops_the_client_like_a_reused_socket_id(broker, config,  # type: ignore[no-untyped-def]
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """qlpc.py QuickLink._request registers a ring request's id with the channel, which raises
    ProtocolError for an id still awaiting its reply. Nothing catches it: it escapes from the
    server's receive() (and from ConnectionPort.wait(), see below) and the connection stays up,
    where the same lie over the socket drops the connection with a CLIENT_DIED notice."""
    with quick_connection(config, "q.fault.dup", monkeypatch) as (_, server, _client, region):
        publish_requests(region, [ID_BIT | 7, ID_BIT | 7])
        first = server.receive(timeout=10)
        assert first.id == ID_BIT | 7
        try:
            second = server.receive(timeout=10)
        except alpc.ProtocolError as exc:
            pytest.fail(f"receive() raised {exc!r} to the application; connection failed: "
                        f"{server._failure is not None}")
        assert second.type is alpc.MessageType.CLIENT_DIED and "protocol error" in second.reason


@native
def test_a_reused_ring_id_does_not_escape_from_the_port_wait(broker, config,  # type: ignore[no-untyped-def]
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The multiplexing server: one client's reused ring id raises out of ConnectionPort.wait(),
    the loop that serves every client."""
    with quick_connection(config, "q.fault.dupwait", monkeypatch) as (port, _server, client, region):
        publish_requests(region, [ID_BIT | 9, ID_BIT | 9])
        client._send(client._channel.doorbell, None)  # wake a server that waits in poll()
        events = []
        try:
            while not events or events[-1].type is not alpc.MessageType.CLIENT_DIED:
                events.append(port.wait(timeout=10))
        except alpc.ProtocolError as exc:
            pytest.fail(f"ConnectionPort.wait() raised {exc!r}; events before: {events}")
        assert "protocol error" in events[-1].reason and len(events) <= 2


# -- fork while a thread waits on the rings: the child's close() never returns ---------


def wait_child(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None if it is still running after ``timeout`` (then killed)."""
    pidfd = os.pidfd_open(pid)
    try:
        exited, _, _ = select.select([pidfd], [], [], timeout)  # readable once the child has exited
    finally:
        os.close(pidfd)
    if not exited:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if exited else None


@native
def test_closing_a_ring_in_a_child_forked_during_a_call_returns() -> None:
    """qlpc.c after_fork_child() drops the watches but leaves each channel's `users` count as
    the parent had it. A thread blocked in qlpc_call() at fork time holds a use that nobody in
    the child will ever release, so qlpc_close() (close(), or the cffi finalizer qlpc_free)
    loops on `users != 0` forever in the child."""
    with make_pair(slots=4, slot_size=128) as pair:
        call = in_thread(pair.client.call, b"x", 1, deadline(30))
        until(lambda: pair.word(CLIENT_SIDE, STATE) == ST_FUTEX)  # the caller sleeps in the futex
        child = os.fork()
        if child == 0:
            try:
                pair.client.close()
            finally:
                os._exit(0)
        code = wait_child(child, 5.0)
        pair.client.close()  # the parent's caller sees Q_CLOSED
        call.join(10)
        assert call.result == [Q_CLOSED]
        assert code == 0, "the forked child's close() of the ring never returned"


# -- a signal handler that raises right after the ring call leaves the call in flight -----


def region_word(region: mmap.mmap, offset: int) -> int:
    value: int = struct.unpack_from("<I", region, offset)[0]
    return value


@native
def test_an_interrupted_call_does_not_leave_the_ring_call_in_flight(broker, config,  # type: ignore[no-untyped-def]
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """qlpc.py bind_call(): c_call() returns Q_INTR so that Python runs the signal handler, and
    CPython runs it as soon as the C call returns, inside call() itself, before _call_slow()'s
    try/except that abandons the call. The handler's exception then leaves the C side's
    `calling` flag and `calling_id` set for good: every later call gets Q_BUSY and takes the
    socket, and the stale id is still "in flight" (a late socket reply to it is filed, never
    dropped)."""
    class Alarm(Exception):
        pass

    def raise_alarm(*_: object) -> None:
        raise Alarm

    with quick_connection(config, "q.fault.intr", monkeypatch) as (_, server, client, region):
        def serve() -> None:
            while True:
                try:
                    message = server.receive(timeout=10)
                except alpc.AlpcError:
                    return
                if message.type is not alpc.MessageType.REQUEST:
                    return
                if message.data != b"noreply":
                    message.reply(message.data.upper())

        serving = threading.Thread(target=serve, daemon=True)
        serving.start()
        assert client.call(b"warm", timeout=10) == b"WARM"
        until(lambda: region_word(region, SERVER_SIDE + STATE) == ST_FUTEX)  # no doorbell: one C call
        main = threading.main_thread().ident
        assert main == threading.get_ident()

        def interrupt() -> None:
            until(lambda: region_word(region, CLIENT_SIDE + STATE) == ST_FUTEX)
            signal.pthread_kill(main, signal.SIGUSR1)  # type: ignore[arg-type]

        previous = signal.signal(signal.SIGUSR1, raise_alarm)
        try:
            kicker = threading.Thread(target=interrupt)
            kicker.start()
            with pytest.raises(Alarm):
                client.call(b"noreply", timeout=30)
            kicker.join(10)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        ring = client._quick.ring  # type: ignore[union-attr]
        stale = ring.in_flight()
        # The interrupted call was cancelled at the server over the socket, so the next call may
        # take the socket too (a side posts to its ring once the peer read its socket bytes);
        # once that round trip is over, calls take the ring again.
        assert client.call(b"next", timeout=10) == b"NEXT"
        before = ring.counts()["messages_out"]
        assert client.call(b"again", timeout=10) == b"AGAIN"
        went_by_ring = ring.counts()["messages_out"] - before
        client.close()
        serving.join(10)
        assert stale == 0 and went_by_ring == 1, (
            f"after the interrupted call, ring call {stale:#x} stays in flight and the next call "
            f"took the {'ring' if went_by_ring else 'socket'}")

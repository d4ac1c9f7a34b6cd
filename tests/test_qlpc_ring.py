"""Quick-LPC rings in one process: a server and a client QuickRing over the same
region, with a Python mapping beside them to write what a hostile peer would.

Threads stand in for the two processes (every ring call releases the GIL);
test_qlpc.py does the same across real processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qlpc_harness import (
    BULK,
    BULK_SIZE,
    CLIENT_SIDE,
    ENTRY,
    HEAD,
    ID_BIT,
    REPLY,
    REQUEST,
    SERVER_SIDE,
    STATE,
    TAIL,
    Pair,
    deadline,
    make_pair,
    native,
)

from alpc import _native
from alpc._native import (
    Q_BUSY,
    Q_CHECK,
    Q_CLOSED,
    Q_DOORBELL,
    Q_E_INDEX,
    Q_E_KIND,
    Q_E_LENGTH,
    Q_E_RESERVED,
    Q_FULL,
    Q_INTR,
    Q_LARGE,
    Q_ORDER,
    Q_TIMEOUT,
    Q_TOO_LARGE,
    QUICK_ERRORS,
    QuickRing,
    quick_region_size,
)
from alpc.errors import ProtocolError
from alpc.section import Section


def test_region_size_twin_agrees_with_c() -> None:
    for slots in (0, 1, 2, 3, 8, 1024, 2048):
        for slot_size in (32, 64, 100, 512, 65536, 65600):
            rings = 512 + 2 * slots * slot_size
            expected = (rings + 4095) // 4096 * 4096 + 2 * BULK_SIZE  # the bulk areas from the next page
            valid = slots in (1, 2, 8, 1024) and slot_size in (64, 512, 65536)
            assert quick_region_size(slots, slot_size) == (expected if valid else 0)


def test_pure_mode_reports_quick_lpc_unavailable() -> None:
    if _native.IMPLEMENTATION == "python":
        assert _native.QUICK_UNAVAILABLE is not None and "C extension" in _native.QUICK_UNAVAILABLE
        with pytest.raises(ImportError):
            QuickRing(0, 0, 1, 64, server=True, sock_fd=0, pidfd=None, spin_ns=0)
    else:
        assert _native.QUICK_UNAVAILABLE is None


@pytest.fixture
def pair() -> Iterator[Pair]:
    with make_pair(slots=4, slot_size=128) as made:
        yield made


def in_thread(target, *args):  # type: ignore[no-untyped-def]
    """Run target(*args) on a thread; returns a callable giving its result (or raising
    its error), whose ``thread`` attribute is the thread."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(target(*args))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()

    def join(timeout: float = 10.0) -> object:
        thread.join(timeout)
        assert not thread.is_alive(), "the ring call did not return"
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    join.thread = thread  # type: ignore[attr-defined]
    return join


# -- the protocol ----------------------------------------------------------------------


@native
def test_a_request_and_its_reply(pair: Pair) -> None:
    reply = in_thread(pair.client.call, b"ping", 4, deadline(10))
    length = pair.server.reply_wait(0, b"", 0, 10_000_000_000)
    assert pair.server.unpack(length) == b"ping"
    request_id = pair.server.info.message_id
    assert request_id & ID_BIT
    assert pair.client.in_flight() == request_id
    assert pair.server.reply_wait(request_id, b"pong!", 5, 0) == Q_TIMEOUT
    assert pair.server.info.posted == 1
    assert reply() == 5
    assert pair.client.unpack(5) == b"pong!"
    assert pair.client.info.callback_id == request_id
    assert pair.client.in_flight() == 0
    counts = pair.client.counts()
    assert (counts["messages_out"], counts["bytes_out"], counts["messages_in"], counts["bytes_in"]) == (1, 4, 1, 5)


@native
@pytest.mark.parametrize("late", [b"late", b"L" * 5000], ids=["slot", "bulk"])  # a bulk one is dropped uncopied
def test_a_late_reply_is_dropped_and_the_next_call_gets_its_own(pair: Pair, late: bytes) -> None:
    assert pair.client.call(b"one", 3, deadline(0.01)) == Q_TIMEOUT
    assert pair.client.info.posted == 1
    first = pair.client.in_flight()
    pair.client.call_done()
    assert pair.server.reply_wait(0, b"", 0, 0) == 3
    assert pair.server.reply(first, late) == 0
    second = in_thread(pair.client.call, b"two", 3, deadline(10))
    assert pair.server.reply_wait(0, b"", 0, 10_000_000_000) == 3
    assert pair.server.unpack(3) == b"two"
    assert pair.server.reply(pair.server.info.message_id, b"TWO") == 0
    assert second() == 3
    assert pair.client.unpack(3) == b"TWO"
    assert pair.client.info.dropped == 1


@native
def test_one_call_in_flight_at_a_time(pair: Pair) -> None:
    assert pair.client.call(b"a", 1, deadline(0)) == Q_TIMEOUT
    assert pair.client.call(b"b", 1, deadline(0)) == Q_BUSY
    assert pair.client.info.posted == 0
    pair.client.call_done()
    assert pair.client.call(b"c", 1, deadline(0)) == Q_TIMEOUT


@native
def test_a_body_too_large_for_the_bulk_area_is_refused(pair: Pair) -> None:
    big = b"x" * (pair.client.bulk_max + 1)
    assert pair.client.call(big, len(big), deadline(0)) == Q_TOO_LARGE
    assert pair.client.info.posted == 0
    exact = big[:-1]
    assert pair.client.call(exact, len(exact), deadline(0)) == Q_TIMEOUT
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.take_bulk() == len(exact)
    assert pair.server.bulk_body == exact


@native
def test_a_body_that_fits_a_slot_stays_in_the_slot(pair: Pair) -> None:
    exact = b"s" * pair.client.payload_max
    assert pair.client.call(exact, len(exact), deadline(0)) == Q_TIMEOUT
    assert pair.server.reply_wait(0, b"", 0, 0) == len(exact)
    assert pair.server.info.bulk == 0
    assert pair.server.unpack(len(exact)) == exact


@native
@pytest.mark.parametrize("size", [200, 64 * 1024, 1 << 20])
def test_a_large_request_and_a_large_reply_go_through_the_bulk_areas(pair: Pair, size: int) -> None:
    request = os.urandom(size)
    answer = os.urandom(size)
    reply = in_thread(pair.client.call, request, size, deadline(10))
    assert pair.server.reply_wait(0, b"", 0, 10_000_000_000) == Q_LARGE
    info = pair.server.info
    assert (info.bulk, info.length, info.taken) == (1, size, 0)
    request_id = info.message_id
    assert pair.server.take_bulk() == size
    assert pair.server.bulk_body == request and info.taken == 1
    assert pair.server.reply_wait(request_id, answer, size, 0) == Q_TIMEOUT
    assert pair.server.info.posted == 1
    assert reply() == Q_LARGE
    assert pair.client.in_flight() == request_id  # the call is over once the reply is taken
    assert pair.client.take_bulk() == size
    assert pair.client.bulk_body == answer
    assert pair.client.in_flight() == 0
    counts = pair.client.counts()
    assert (counts["messages_out"], counts["bytes_out"], counts["messages_in"], counts["bytes_in"]) == (
        1, size, 1, size)


@native
def test_an_untaken_bulk_entry_waits_for_the_next_look(pair: Pair) -> None:
    """A caller that never calls take_bulk (an exception between the two calls) loses nothing."""
    body = b"b" * 1000
    assert pair.client.call(body, len(body), deadline(0)) == Q_TIMEOUT
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.waiting() == 1
    assert pair.server.take_bulk() == len(body)
    assert pair.server.bulk_body == body
    assert pair.server.take_bulk() == Q_BUSY  # taken already: nothing to take twice
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_TIMEOUT


@native
def test_the_bulk_area_holds_one_message_until_the_peer_took_it(pair: Pair) -> None:
    first, second = b"1" * 300, b"2" * 300
    assert pair.client.call(first, len(first), deadline(0)) == Q_TIMEOUT
    pair.client.call_done()
    # Small ones still pass; a second large one would overwrite bytes not yet copied out.
    assert pair.client.call(b"small", 5, deadline(0)) == Q_TIMEOUT
    pair.client.call_done()
    assert pair.client.call(second, len(second), deadline(0)) == Q_FULL
    assert pair.client.info.posted == 0
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.take_bulk() == len(first)
    assert pair.client.call(second, len(second), deadline(0)) == Q_TIMEOUT
    pair.client.call_done()
    assert pair.server.reply_wait(0, b"", 0, 0) == 5
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.take_bulk() == len(second)
    assert pair.server.bulk_body == second


@native
def test_trimming_gives_a_free_bulk_area_back_and_leaves_a_busy_one(pair: Pair) -> None:
    def held() -> int:
        return os.fstat(pair.fd).st_blocks * 512

    empty = held()
    body = b"t" * BULK_SIZE
    assert pair.client.call(body, len(body), deadline(0)) == Q_TIMEOUT
    pair.client.call_done()
    assert held() >= empty + BULK_SIZE
    assert pair.client.trim_bulk() == Q_FULL  # the server has not copied it out yet
    assert held() >= empty + BULK_SIZE
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.take_bulk() == BULK_SIZE and pair.server.bulk_body == body
    assert pair.client.trim_bulk() == 0
    assert held() == empty
    assert pair.server.trim_bulk() == 0  # (an area never used: nothing to give back)
    again = b"u" * 5000
    assert pair.client.call(again, len(again), deadline(0)) == Q_TIMEOUT
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.take_bulk() == len(again) and pair.server.bulk_body == again


@native
def test_a_limit_below_the_bulk_area_refuses_longer_entries(pair: Pair) -> None:
    pair.server.limit_bulk(4096)
    body = b"z" * 4097
    assert pair.client.call(body, len(body), deadline(0)) == Q_TIMEOUT
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_E_LENGTH


@native
def test_a_full_ring_is_refused(pair: Pair) -> None:
    for _ in range(pair.slots):
        assert pair.client.call(b"q", 1, deadline(0)) == Q_TIMEOUT
        pair.client.call_done()
    assert pair.client.call(b"q", 1, deadline(0)) == Q_FULL
    assert pair.client.info.posted == 0
    assert pair.server.reply_wait(0, b"", 0, 0) == 1
    assert pair.client.call(b"q", 1, deadline(0)) == Q_TIMEOUT


@native
def test_ring_posts_wait_until_the_peer_read_our_socket_bytes(pair: Pair) -> None:
    pair.client.sent(100)
    assert pair.client.call(b"r", 1, deadline(0)) == Q_ORDER
    assert pair.client.info.posted == 0
    pair.server.consumed(60)
    assert pair.client.call(b"r", 1, deadline(0)) == Q_ORDER
    pair.server.consumed(40)
    assert pair.client.call(b"r", 1, deadline(0)) == Q_TIMEOUT


@native
def test_ring_posts_may_overtake_the_runtimes_own_socket_bytes(pair: Pair) -> None:
    """Releases and credits carry no message: a ring post need not wait for the peer to read
    them, only for the last write that carried one."""
    pair.client.sent(100)
    pair.client.sent(64, False)  # a release after it
    pair.server.consumed(100)
    assert pair.client.call(b"r", 1, deadline(0)) == Q_TIMEOUT
    pair.client.call_done()
    pair.client.sent(64, False)
    pair.client.sent(30)  # a message after the release: both must be read first
    pair.server.consumed(64)
    assert pair.client.call(b"r", 1, deadline(0)) == Q_ORDER
    pair.server.consumed(94)
    assert pair.client.call(b"r", 1, deadline(0)) == Q_TIMEOUT


@native
def test_a_server_waiting_in_poll_gets_a_doorbell_once(pair: Pair) -> None:
    assert pair.server.arm_poll() == 0
    assert pair.client.call(b"1", 1, deadline(0)) == Q_DOORBELL
    assert pair.client.info.posted == 1
    pair.client.call_done()
    assert pair.client.call(b"2", 1, deadline(0)) == Q_TIMEOUT
    pair.client.call_done()
    assert pair.server.arm_poll() == 1


@native
def test_socket_traffic_wakes_a_waiter(pair: Pair) -> None:
    waiting = in_thread(pair.server.reply_wait, 0, b"", 0, 10_000_000_000)
    time.sleep(0.05)  # handshake-free: let the waiter block in the futex first
    pair.client_sock.send(b"x")
    pair.client.sent(1)
    assert waiting() == Q_CHECK
    assert pair.server_sock.recv(1) == b"x"
    pair.server.consumed(1)
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_TIMEOUT


@native
def test_a_hang_up_wakes_a_waiter_at_once(pair: Pair) -> None:
    waiting = in_thread(pair.server.reply_wait, 0, b"", 0, -1)
    time.sleep(0.05)  # handshake-free: let the waiter block in the futex first
    started = time.monotonic()
    pair.client_sock.shutdown(socket.SHUT_RDWR)
    assert waiting() == Q_CHECK
    assert time.monotonic() - started < 0.5
    assert pair.server.reply_wait(0, b"", 0, -1) == Q_CHECK


@native
def test_the_death_of_the_peer_process_wakes_a_waiter() -> None:
    """The pidfd is watched too: a forked child holding the socket cannot hide the death."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    pidfd = os.pidfd_open(child.pid)
    size = quick_region_size(2, 64)
    section = Section.create(size, backend="memfd", shared_writable=True)
    mine, theirs = socket.socketpair()
    try:
        ring = QuickRing(section.fd, size, 2, 64, server=True, sock_fd=mine.fileno(), pidfd=pidfd, spin_ns=0)
        waiting = in_thread(ring.reply_wait, 0, b"", 0, -1)
        time.sleep(0.05)  # handshake-free: let the waiter block in the futex first
        started = time.monotonic()
        child.kill()
        assert waiting() == Q_CHECK
        assert time.monotonic() - started < 0.5
        ring.close()
    finally:
        child.wait()
        assert child.stdin is not None
        child.stdin.close()
        os.close(pidfd)
        section.close()
        mine.close()
        theirs.close()


@native
def test_closing_wakes_a_waiter_and_later_calls_fail_cleanly(pair: Pair) -> None:
    waiting = in_thread(pair.server.reply_wait, 0, b"", 0, -1)
    time.sleep(0.05)  # handshake-free: let the waiter block in the futex first
    pair.server.close()
    assert waiting() == Q_CLOSED
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_CLOSED
    assert pair.server.reply(ID_BIT | 1, b"x") == Q_CLOSED
    pair.server.sent(1)
    pair.server.close()


@native
def test_the_client_checks_the_region_header() -> None:
    size = quick_region_size(2, 64)
    section = Section.create(size, backend="memfd", shared_writable=True)
    mine, theirs = socket.socketpair()
    try:
        with pytest.raises(ProtocolError, match="geometry"):
            QuickRing(section.fd, size, 2, 64, server=False, sock_fd=mine.fileno(), pidfd=None, spin_ns=0)
    finally:
        section.close()
        mine.close()
        theirs.close()


# -- hostile contents ------------------------------------------------------------------


@native
@pytest.mark.parametrize(("entry", "error"), [
    ({"kind": REPLY}, Q_E_KIND),
    ({"kind": 99}, Q_E_KIND),
    ({"length": 1 << 20}, Q_E_LENGTH),
    ({"length": 97}, Q_E_LENGTH),
    ({"kind": REQUEST | BULK, "length": BULK_SIZE + 1}, Q_E_LENGTH),
    ({"kind": REPLY | BULK}, Q_E_KIND),
    ({"kind": BULK}, Q_E_KIND),
    ({"kind": REQUEST | BULK, "reserved": 1}, Q_E_RESERVED),
    ({"reserved": 1}, Q_E_RESERVED),
    ({"message_id": 5}, Q_E_RESERVED),
    ({"message_id": 0}, Q_E_RESERVED),
    ({"callback_id": ID_BIT | 3}, Q_E_RESERVED),
])
def test_a_broken_entry_is_refused(pair: Pair, entry: dict[str, int], error: int) -> None:
    pair.publish_request(**entry)
    assert pair.server.reply_wait(0, b"", 0, 0) == error
    assert error in QUICK_ERRORS


@native
@pytest.mark.parametrize("tail", [5, 1000, 0xFFFFFFFF])
def test_a_lying_tail_is_refused(pair: Pair, tail: int) -> None:
    pair.set_word(CLIENT_SIDE, TAIL, tail)
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_E_INDEX


@native
@pytest.mark.parametrize("head", [7, 0xFFFFFFF0])
def test_a_lying_head_is_refused(pair: Pair, head: int) -> None:
    pair.set_word(SERVER_SIDE, HEAD, head)
    assert pair.client.call(b"x", 1, deadline(0)) == Q_E_INDEX
    assert pair.client.info.posted == 0


@native
def test_a_bulk_entry_rewritten_before_its_take_is_not_taken(pair: Pair) -> None:
    pair.publish_request(kind=REQUEST | BULK, length=300)
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    ENTRY.pack_into(pair.region, pair.client_slot(0), REQUEST | BULK, 301, ID_BIT | 1, 0, 0, 0, 0)
    assert pair.server.take_bulk() == Q_BUSY
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.take_bulk() == 301


@native
def test_a_half_written_entry_is_invisible(pair: Pair) -> None:
    """What a writer killed mid-entry leaves: bytes in a slot, no published index."""
    ENTRY.pack_into(pair.region, pair.client_slot(0), REQUEST, 1 << 20, 0, 0, 0, 0, 0)
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_TIMEOUT


@native
def test_garbage_states_and_cpus_only_make_the_producer_wake_us(pair: Pair) -> None:
    pair.set_word(SERVER_SIDE, STATE, 0xDEAD)
    pair.set_word(SERVER_SIDE, 16, 0x7FFFFFFF)
    assert pair.client.call(b"x", 1, deadline(0)) == Q_TIMEOUT
    assert pair.client.counts()["wakes"] == 1


@native
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(side=st.binary(min_size=40, max_size=40), ring=st.binary(min_size=4 * 128, max_size=4 * 128))
def test_any_client_contents_give_a_request_or_an_error(pair: Pair, side: bytes, ring: bytes) -> None:
    """Whatever a client writes in its words and its ring, the server gets a valid
    request, nothing, or a protocol error: never a crash or an out-of-bounds read."""
    start = 512 + pair.slots * pair.slot_size
    pair.region[CLIENT_SIDE:CLIENT_SIDE + 40] = side
    pair.region[start:start + len(ring)] = ring
    for _ in range(pair.slots + 1):
        status = pair.server.reply_wait(0, b"", 0, 0)
        if status == Q_LARGE:
            assert pair.server.info.length <= pair.server.bulk_max
            status = pair.server.take_bulk()
        assert status in QUICK_ERRORS or status in (Q_TIMEOUT, Q_CHECK) or 0 <= status <= pair.server.payload_max
        if status < 0:
            break
        assert pair.server.info.message_id & ID_BIT
    pair.region[CLIENT_SIDE:CLIENT_SIDE + 40] = bytes(40)


@native
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(side=st.binary(min_size=40, max_size=40), ring=st.binary(min_size=4 * 128, max_size=4 * 128))
def test_any_server_contents_give_a_reply_or_an_error(pair: Pair, side: bytes, ring: bytes) -> None:
    pair.client.call_done()
    pair.region[SERVER_SIDE:SERVER_SIDE + 40] = side
    pair.region[512:512 + len(ring)] = ring
    status = pair.client.call(b"q", 1, deadline(0))
    if status == Q_LARGE:
        assert pair.client.info.length <= pair.client.bulk_max
        status = pair.client.take_bulk()
    assert status in QUICK_ERRORS or status in (Q_TIMEOUT, Q_CHECK, Q_FULL, Q_ORDER, Q_DOORBELL) or (
        0 <= status <= pair.client.payload_max)
    pair.region[SERVER_SIDE:SERVER_SIDE + 40] = bytes(40)


# -- adaptive waiting -------------------------------------------------------------------


def ping_pong(cpus: tuple[int, int], rounds: int) -> tuple[dict[str, int], dict[str, int]]:
    """Client and server threads pinned to ``cpus``, answering each other ``rounds`` times."""
    with make_pair(slots=4, slot_size=128, spin_us=200) as made:
        def serve() -> None:
            os.sched_setaffinity(0, {cpus[1]})
            reply_id = 0
            for _ in range(rounds):
                length = made.server.reply_wait(reply_id, b"r", 1 if reply_id else 0, 10_000_000_000)
                assert length == 1
                reply_id = made.server.info.message_id
            assert made.server.reply(reply_id, b"r") == 0

        served = in_thread(serve)
        os.sched_setaffinity(0, {cpus[0]})
        try:
            # Until both have waited once, a side may see where the other ran before pinning.
            for _ in range(WARM_UP):
                assert made.client.call(b"q", 1, deadline(10)) == 1
            client, server = made.client.counts(), made.server.counts()
            for _ in range(rounds - WARM_UP):
                assert made.client.call(b"q", 1, deadline(10)) == 1
        finally:
            os.sched_setaffinity(0, ALL_CPUS)
        served()
        return _delta(made.client.counts(), client), _delta(made.server.counts(), server)


WARM_UP = 20


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after}


ALL_CPUS = os.sched_getaffinity(0)


@native
def test_sharing_a_cpu_never_spins() -> None:
    """Spinning on the peer's CPU only delays the peer: block at once instead."""
    cpu = min(ALL_CPUS)
    client, server = ping_pong((cpu, cpu), 300)
    for counts in (client, server):
        assert counts["spins_caught"] == counts["spins_missed"] == 0
    # The waits that found nothing slept at once. (On a busy CPU one side can find every message
    # already there, the peer having run while it was preempted: so count both sides' sleeps.)
    assert client["sleeps"] + server["sleeps"] > 0


@native
@pytest.mark.skipif(len(ALL_CPUS) < 2, reason="needs two CPUs")
def test_two_cpus_spin_instead_of_sleeping() -> None:
    low, high = sorted(ALL_CPUS)[:2]
    client, server = ping_pong((low, high), 2000)
    # On a loaded machine (other suites share these CPUs) many waits still end
    # in the futex; an idle one catches nearly all 2 x 1980 of them spinning.
    assert client["spins_caught"] + server["spins_caught"] > 200


@native
def test_a_signal_returns_to_python(pair: Pair) -> None:
    """A signal ends a blocked wait with Q_INTR, so Python runs its handler (Ctrl-C works)."""
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        waiting = in_thread(pair.server.reply_wait, 0, b"", 0, 10_000_000_000)
        time.sleep(0.05)  # handshake-free: the signal must land while the waiter sleeps
        started = time.monotonic()
        signal.pthread_kill(waiting.thread.ident, signal.SIGUSR1)  # type: ignore[attr-defined]
        assert waiting() == Q_INTR
        assert time.monotonic() - started < 1
    finally:
        signal.signal(signal.SIGUSR1, previous)

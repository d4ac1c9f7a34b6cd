"""Signals and interrupted waits: a Python signal handler runs while a call waits, an
exception it raises leaves the connection usable or cleanly failed, and a handler that
returns does not give the wait its whole timeout again.

Peers are real processes (tests/signal_peers.py); the stimulus is a timer signal, or a
signal sent to the main thread once the state it must interrupt is observable.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from local_pairs import fill_socket
from test_qlpc_faults import until  # tests/ is on sys.path, as for tests/test_rpc_e2e.py

import alpc
from alpc import _native

PEERS = Path(__file__).resolve().parent / "signal_peers.py"
native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
pytestmark = pytest.mark.timeout(60)


class Interrupted(Exception):
    """What the tests' signal handlers raise (as Ctrl-C raises KeyboardInterrupt)."""


@pytest.fixture
def peer(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    """peer(role, name) starts tests/signal_peers.py and waits for its READY line
    (not with ready=False: a client is READY once accepted)."""
    def start(role: str, name: str, *options: str, ready: bool = True):  # type: ignore[no-untyped-def]
        process = spawn.argv([sys.executable, str(PEERS), role, name, "--runtime-dir", str(runtime_dir), *options])
        if ready:
            process.ready = process.expect("READY")
        return process
    return start


@pytest.fixture
def handler() -> Iterator[Callable[[int, Callable[..., None]], None]]:
    """handler(signum, function): install a signal handler for the test; timers and handlers
    are put back afterwards."""
    installed: list[tuple[int, object]] = []

    def install(signum: int, function: Callable[..., None]) -> None:
        installed.append((signum, signal.signal(signum, function)))

    yield install
    signal.setitimer(signal.ITIMER_REAL, 0)
    for signum, previous in reversed(installed):
        signal.signal(signum, previous)  # type: ignore[arg-type]


def unsent_bytes(fd: int) -> int:
    """Bytes written to a Unix stream socket that its peer has not read yet (SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0])


def interrupt_main_when(condition: Callable[[], bool]) -> threading.Thread:
    """Send SIGUSR1 to the main thread once ``condition`` holds (it is blocked by then)."""
    main = threading.main_thread().ident
    assert main is not None

    def kick() -> None:
        until(condition)
        signal.pthread_kill(main, signal.SIGUSR1)

    kicker = threading.Thread(target=kick, daemon=True)
    kicker.start()
    return kicker


def raise_interrupted(*_: object) -> None:
    raise Interrupted


# -- a send interrupted while the peer's socket is full ---------------------------------


def test_a_send_interrupted_mid_frame_does_not_corrupt_the_stream(broker, config, peer, handler) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C in a send blocked on a full socket, after part of the frame went out: the rest of
    that frame never follows, so the connection must fail (as a send timing out mid-frame does)
    rather than write the next message into the middle of the cut frame, where the peer takes
    its bytes as the rest of the first body and never sees the message."""
    server = peer("server", "sig.midframe")
    handler(signal.SIGUSR1, raise_interrupted)
    with alpc.connect("sig.midframe", config=config, timeout=10) as comm:
        server.expect("ACCEPTED")
        fd = comm.fileno()
        kicker = interrupt_main_when(lambda: unsent_bytes(fd) > 0)
        with pytest.raises(Interrupted):
            comm.send(b"B" * (2 * 1024 * 1024), timeout=30)  # far more than the socket buffers
        kicker.join(10)
        server.send("read")
        try:
            comm.send(b"after", timeout=10)
            sent = True
        except alpc.ConnectionClosed:
            sent = False  # cleanly failed: fine too, once the server hears of it
            comm.close()
        seen = server.expect("")
        if sent:
            assert seen == ["DATAGRAM", "5", "after"], f"the message after the cut frame was lost: {seen}"
        else:
            assert seen[0] in ("CLIENT_DIED", "PORT_CLOSED", "CLOSED"), seen


def test_a_datagram_interrupted_before_any_byte_left_gives_its_window_slot_back(broker, config, peer, handler) -> None:  # type: ignore[no-untyped-def]
    """A send whose write timed out with nothing written gives back its slot in the peer's
    datagram window; one interrupted by a signal handler (Ctrl-C) must too, or every Ctrl-C on a
    slow reader shrinks the producer's window for good, until every send is Throttled."""
    server = peer("server", "sig.slot")
    handler(signal.SIGUSR1, raise_interrupted)
    with alpc.connect("sig.slot", config=config, timeout=10) as comm:
        server.expect("ACCEPTED")
        flow = comm._core.channel.flow
        sent = fill_socket(comm, 16384, 0.05)
        assert 0 < sent < 100 and flow.datagrams_out == sent
        kicker = interrupt_main_when(lambda: flow.datagrams_out > sent)  # this send took its slot
        with pytest.raises(Interrupted):
            comm.send(b"d" * 16384, timeout=30)
        kicker.join(10)
        assert not comm.closed
        assert flow.datagrams_out == sent, "the interrupted send kept its slot in the peer's window"


def test_datagrams_queued_before_an_interrupted_send_are_not_lost(broker, config, peer, handler) -> None:  # type: ignore[no-untyped-def]
    """Datagrams queued with send(flush=False) ride with the next write; when that write is
    interrupted (Ctrl-C) before any byte left, they must stay queued, as after a timeout, not
    vanish: the next flush() still delivers them."""
    server = peer("server", "sig.backlog")
    handler(signal.SIGUSR1, raise_interrupted)
    with alpc.connect("sig.backlog", config=config, timeout=10) as comm:
        server.expect("ACCEPTED")
        flow = comm._core.channel.flow
        sent = fill_socket(comm, 16384, 0.05)
        comm.send(b"queued-1", flush=False)
        comm.send(b"queued-2", flush=False)
        assert flow.datagrams_out == sent + 2
        kicker = interrupt_main_when(lambda: flow.datagrams_out > sent + 2)  # the next send is under way
        with pytest.raises(Interrupted):
            comm.send(b"now", timeout=30)
        kicker.join(10)
        server.send("read")
        for _ in range(sent):
            assert server.expect("DATAGRAM")[0] == "16384"
        comm.flush(timeout=10)
        assert server.expect("") == ["DATAGRAM", "8", "queued-1"]
        assert server.expect("") == ["DATAGRAM", "8", "queued-2"]


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_reply_interrupted_before_any_byte_left_can_be_sent_again(broker, config, peer, handler) -> None:  # type: ignore[no-untyped-def]
    """A server's reply blocked on a client that does not read (stopped), interrupted by a
    signal handler (Ctrl-C) with nothing written: the request must still be owed, so the
    application can answer it once it caught the exception. It was taken as answered: the
    second reply() was refused (ValueError), and the client waited for a reply that never came."""
    handler(signal.SIGALRM, raise_interrupted)
    with alpc.create_port("sig.reply", config=config) as port:
        client = peer("caller", "sig.reply", ready=False)
        with port.listen(timeout=10).accept() as comm:
            client.expect("READY")
            client.send("go")
            request = comm.receive(timeout=10)
            assert request.data == b"work"
            client.proc.send_signal(signal.SIGSTOP)
            try:
                until(lambda: process_state(client.pid) == "T")
                while True:  # fill the client's socket: it reads nothing while stopped
                    try:
                        comm.send(b"d" * 16384, timeout=0.05)
                    except alpc.Timeout:
                        break
                signal.setitimer(signal.ITIMER_REAL, 0.3)
                with pytest.raises(Interrupted):
                    request.reply(b"first", timeout=30)
            finally:
                client.proc.send_signal(signal.SIGCONT)
            try:
                request.reply(b"again", timeout=10)
            except alpc.ConnectionClosed:
                assert client.expect("", timeout=10)[0] == "ERROR"  # cleanly failed: fine too
            else:
                assert client.expect("", timeout=10) == ["REPLY", "again"]


# -- Quick-LPC: a handler that returns does not restart the wait's timeout --------------


@native
def test_a_signal_does_not_restart_a_quick_receive_timeout(broker, config, peer, handler) -> None:  # type: ignore[no-untyped-def]
    """A server's receive() on a Quick-LPC connection waits on the ring; a signal whose handler
    returns (an alarm, SIGCHLD) ends that ring wait with Q_INTR, and the socket wait that follows
    must have what is left of the timeout, not all of it again."""
    ticks: list[float] = []
    handler(signal.SIGALRM, lambda *_: ticks.append(time.monotonic()))
    with alpc.create_port("sig.qrecv", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        client = peer("client", "sig.qrecv", ready=False)
        with port.listen(timeout=10).accept() as comm:
            assert client.expect("READY")[-1] == "True"
            until(lambda: comm.quick)
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, 1.5)
            with pytest.raises(alpc.Timeout):
                comm.receive(timeout=2.0)
            waited = time.monotonic() - started
            assert ticks, "the handler did not run during the wait"
            assert waited < 2.9, f"receive(timeout=2.0) took {waited:.2f}s: the signal restarted its timeout"


@native
def test_periodic_signals_do_not_keep_serve_requests_from_timing_out(broker, config, peer, handler) -> None:  # type: ignore[no-untyped-def]
    """serve_requests(handler, timeout) over the rings: ``timeout`` bounds each wait for the
    next message. A periodic timer signal (whose handler returns) must not restart that wait's
    timeout each time, or it never times out at all."""
    ticks: list[float] = []

    def tick(*_: object) -> None:
        ticks.append(time.monotonic())
        if len(ticks) > 15:
            raise Interrupted  # ~4.5 s of waiting: the timeout never came

    handler(signal.SIGALRM, tick)
    with alpc.create_port("sig.qserve", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        client = peer("client", "sig.qserve", ready=False)
        with port.listen(timeout=10).accept() as comm:
            assert client.expect("READY")[-1] == "True"
            until(lambda: comm.quick)
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, 0.3, 0.3)
            try:
                with pytest.raises(alpc.Timeout):
                    comm.serve_requests(bytes, timeout=1.0)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            waited = time.monotonic() - started
            assert len(ticks) >= 2
            assert waited < 2.5, f"serve_requests(timeout=1.0) took {waited:.2f}s"


SYSCALLS = {"x86_64": {"futex": "202", "poll": "7", "ppoll": "271"},
            "aarch64": {"futex": "98", "ppoll": "73"}}.get(os.uname().machine, {})


def in_syscall(thread_id: int, *names: str) -> bool:
    """Is that thread of ours blocked in one of these system calls right now?"""
    with open(f"/proc/self/task/{thread_id}/syscall") as syscall:
        number = syscall.read().split()[0]
    return number in {SYSCALLS.get(name) for name in names}


def in_futex_wait(thread_id: int) -> bool:
    return in_syscall(thread_id, "futex")


def interrupt_a_receive_as_it_takes(comm: alpc.CommunicationPort, client: Any,
                                    blocked: Callable[[int], bool]) -> None:
    """Have a SIGUSR1 (whose handler raises) due in this thread while its receive() waits in C
    (``blocked(tid)``), the client's request arriving then: the receive raises, and the next
    one must still get the request its C call took."""
    main = threading.get_native_id()
    # Set as the main thread enters receive(): before that, a futex wait of the main thread is
    # another one (starting this helper waits in one), and a handler raising there would not
    # be receive()'s to raise (CI once saw Interrupted out of Thread.start()).
    entering = threading.Event()

    def trip_then_call() -> None:
        assert entering.wait(10)
        until(lambda: blocked(main))
        # Delivered to this helper thread: the main thread's wait goes on, with the handler due
        # as soon as it is back in Python.
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        client.send("call hello")

    helper = threading.Thread(target=trip_then_call, daemon=True)
    helper.start()
    with pytest.raises(Interrupted):
        entering.set()
        comm.receive(timeout=20)
    helper.join(10)
    try:
        request = comm.receive(timeout=5)
    except alpc.Timeout:
        pytest.fail("what the wait took as the handler raised was lost")
    assert request.data == b"hello"
    request.reply(b"HELLO")
    assert client.expect("") == ["RESULT", "HELLO"]


@native
def test_a_signal_as_the_ring_hands_over_a_request_does_not_lose_it(broker, config, peer, handler) -> None:  # type: ignore[no-untyped-def]
    """A server's receive() waits on the ring in C with the GIL released. A signal whose
    Python handler raises (Ctrl-C) may be pending when that C call returns a request it took
    from the ring: CPython runs the handler as the call returns, before Python sees the
    request. The request must not vanish with it (the ring already moved past it, so the
    client would wait for a reply until its timeout): the next receive() gets it."""
    handler(signal.SIGUSR1, raise_interrupted)
    with alpc.create_port("sig.qtake", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        client = peer("client", "sig.qtake", ready=False)
        with port.listen(timeout=10).accept() as comm:
            assert client.expect("READY")[-1] == "True"
            until(lambda: comm.quick)
            interrupt_a_receive_as_it_takes(comm, client, in_futex_wait)


@native
def test_a_signal_as_a_socket_wait_returns_data_does_not_lose_it(broker, config, peer, handler) -> None:  # type: ignore[no-untyped-def]
    """With the C extension a receive() waits and reads the socket in one C call (ppoll, then
    recvmsg) with the GIL released. A signal whose Python handler raises (Ctrl-C) may be
    pending when that call returns the bytes it read: CPython runs the handler as the call
    returns, before Python sees them. They must not vanish with it (the socket moved past
    them: the request is lost, or a frame is cut in two): the next receive() gets the request."""
    handler(signal.SIGUSR1, raise_interrupted)
    # The socket's wait: no Quick-LPC rings.
    with alpc.create_port("sig.sockread", alpc.PortAttributes(quick_lpc=False), config=config) as port:
        client = peer("client", "sig.sockread", ready=False)
        with port.listen(timeout=10).accept() as comm:
            assert client.expect("READY")[-1] == "False"
            interrupt_a_receive_as_it_takes(comm, client, lambda tid: in_syscall(tid, "poll", "ppoll"))

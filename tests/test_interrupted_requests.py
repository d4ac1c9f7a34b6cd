"""The client hears promptly when a server's handler fails or its own wait is interrupted.

- ``serve_requests(handler)`` whose handler raises: the exception reaches the serving code,
  and the request it was answering is answered empty at once (as ``CompletionPort`` and
  ``aio``'s ``serve`` answer a failed handler), on the socket and over Quick-LPC rings alike;
  it used to stay unanswered, so the client waited its whole timeout.
- A signal handler that raises (Ctrl-C) in ``request()`` cancels the request at the server,
  as a timeout does; it used to abandon it silently, and the server's handler ran on.
- ``PendingRequest.result()`` interrupted the same way leaves the request in flight: the
  caller holds it, so ``result()`` may wait again (or ``cancel()`` it); it used to raise
  ``ValueError`` ("already taken") and drop the reply.

Servers are real processes (tests/wait_peers.py); the stimulus is a signal sent to the
main thread once the server says its handler started.
"""

from __future__ import annotations

import platform
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_qlpc_faults import until  # tests/ is on sys.path, as for tests/test_rpc_e2e.py

import alpc
from alpc import _native

PEERS = Path(__file__).resolve().parent / "wait_peers.py"
pytestmark = pytest.mark.timeout(60)
# poll(2), ppoll(2) and futex(2) on x86-64, where the interrupt tests run (elsewhere the numbers differ).
_POLLS = ("7", "271")
_FUTEX = "202"
ring = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
x86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers for x86-64")


class Interrupted(Exception):
    """What the tests' signal handler raises (as Ctrl-C raises KeyboardInterrupt)."""


def _raise_interrupted(*_: object) -> None:
    raise Interrupted


@pytest.fixture
def server(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(role: str, name: str, *options: str):  # type: ignore[no-untyped-def]
        process = spawn.argv([sys.executable, str(PEERS), role, name, "--runtime-dir", str(runtime_dir), *options])
        process.expect("READY")
        return process
    return start


@pytest.fixture
def interrupt() -> Iterator[Callable[[Callable[[], object], alpc.CommunicationPort], threading.Thread]]:
    """interrupt(ready, comm): SIGUSR1 (raising Interrupted) to the main thread once ``ready()``
    returned and the main thread is blocked reading ``comm``: it holds the reader role and sits
    in poll(2), or over Quick-LPC rings it makes a ring call and sits in futex(2) (a signal just
    before the wait would only be seen when the wait ends). The handler is put back afterwards."""
    previous = signal.signal(signal.SIGUSR1, _raise_interrupted)
    main = threading.main_thread()
    assert main.ident is not None and main.native_id is not None
    syscall = Path(f"/proc/self/task/{main.native_id}/syscall")
    kickers: list[threading.Thread] = []

    def arm(ready: Callable[[], object], comm: alpc.CommunicationPort) -> threading.Thread:
        def kick() -> None:
            ready()
            if comm.quick:
                ring = comm._quick.ring  # type: ignore[union-attr]
                until(lambda: ring.in_flight() != 0 and syscall.read_text().split()[0] == _FUTEX)
            else:
                until(lambda: comm._reading and syscall.read_text().split()[0] in _POLLS)
            signal.pthread_kill(main.ident, signal.SIGUSR1)  # type: ignore[arg-type]

        kicker = threading.Thread(target=kick, daemon=True)
        kicker.start()
        kickers.append(kicker)
        return kicker

    yield arm
    for kicker in kickers:
        kicker.join(10)
    signal.signal(signal.SIGUSR1, previous)


# -- serve_requests with a handler that raises -------------------------------------------


@pytest.mark.parametrize("path", ["socket", pytest.param("ring", marks=ring)])
def test_a_failing_serve_requests_handler_answers_its_request_at_once(broker, config, server, path) -> None:  # type: ignore[no-untyped-def]
    name = f"wait.raiser.{path}"
    peer = server("raiser", name, *(["--quick"] if path == "ring" else []))
    with alpc.connect(name, config=config, timeout=10) as comm:
        peer.expect("ACCEPTED")
        assert comm.quick is (path == "ring")
        assert comm.call(b"first", timeout=10) == b"FIRST"
        try:
            answer = comm.request(b"boom", timeout=5)
        except alpc.Timeout:
            pytest.fail("the request whose handler raised was never answered: the client waited its timeout")
        assert answer.data == b""
        assert peer.expect("") == ["RAISED"]  # the exception reached serve_requests' caller
        assert comm.call(b"again", timeout=10) == b"AGAIN"  # and the connection serves on
        comm.send(b"bye", timeout=5)
        assert peer.expect("") == ["DATAGRAM"]


# -- Ctrl-C in request() ------------------------------------------------------------------


@x86_64
@pytest.mark.parametrize("path", ["socket", "serving", pytest.param("ring", marks=ring)])
def test_an_interrupted_request_is_cancelled_at_the_server(broker, config, server, interrupt, path) -> None:  # type: ignore[no-untyped-def]
    name = f"wait.slow.request.{path}"
    peer = server("slow", name, *(["--quick"] if path == "ring" else []))
    with alpc.connect(name, config=config, timeout=10) as comm:
        peer.expect("ACCEPTED")
        assert comm.quick is (path == "ring")
        interrupt(lambda: peer.expect("STARTED"), comm)
        with pytest.raises(Interrupted):
            if path == "serving":  # nested callbacks served meanwhile (rpc's proxies wait this way)
                comm.request(b"work", timeout=30, on_message=lambda message: None)
            else:
                comm.request(b"work", timeout=30)
        assert peer.expect("") == ["CANCELLED"], "the server's handler never heard of the interrupted request"
        assert not comm.closed


# -- Ctrl-C in PendingRequest.result() ---------------------------------------------------


@x86_64
def test_an_interrupted_result_can_be_waited_on_again(broker, config, server, interrupt) -> None:  # type: ignore[no-untyped-def]
    peer = server("slow", "wait.slow.result")
    with alpc.connect("wait.slow.result", config=config, timeout=10) as comm:
        peer.expect("ACCEPTED")
        pending = comm.start_request(b"work", timeout=10)
        interrupt(lambda: peer.expect("STARTED"), comm)
        with pytest.raises(Interrupted):
            pending.result(timeout=30)
        peer.send("reply")
        assert peer.expect("") == ["REPLIED"], peer.stderr()
        assert pending.result(timeout=10).data == b"done"

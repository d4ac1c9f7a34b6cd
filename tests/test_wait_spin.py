"""A waiting socket read spins before it sleeps (transport.SpinBudget): the spin is part of
the wait's timeout, never added to it."""

from __future__ import annotations

import socket
import time

import pytest

from alpc import _native, transport

pytestmark = pytest.mark.timeout(30)

SPIN_US = _native.MAX_SPIN_US  # 1 ms: the longest spin a wait may be asked for
TRIES = 20  # the fastest of several waits: a busy machine may delay any one of them


def _fastest(wait: object) -> float:
    """The shortest of TRIES runs of ``wait()`` (each must find nothing), in seconds."""
    best = float("inf")
    for _ in range(TRIES):
        started = time.perf_counter()
        assert wait() in (False, (False, False))  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.skipif(_native.sock_wait_recv is None, reason="the C wait (no extension in pure-Python mode)")
def test_the_c_wait_spins_within_its_timeout() -> None:
    """alpc_sock_wait_recv(timeout_ms=1, spin_us=1000) on an empty socket: spin, then sleep for
    what is left of the millisecond. It spun 1 ms and then slept a full 1 ms more."""
    left, right = socket.socketpair()
    try:
        assert _native.recv_state is not None
        state = _native.recv_state()

        def wait() -> bool:
            n, _, _, _ = _native.sock_wait_recv(left.fileno(), -1, 1, 0, state, SPIN_US)
            assert n == _native.E_TIMEOUT
            return False

        assert _fastest(wait) < 0.0017
    finally:
        left.close()
        right.close()


def test_a_spin_never_outlasts_the_deadline() -> None:
    """A read whose deadline is 0.2 ms away, with a spin budget of 1 ms: it returns once the
    deadline passed, to the wait's granularity (whole milliseconds for the C wait), not after
    the whole spin (plus, in C, the whole timeout after it)."""
    left, right = socket.socketpair()
    try:
        stream = transport.Stream(left)
        native = _native.sock_wait_recv is not None
        granted = 0.001 if native else 0.0002  # the C wait counts whole milliseconds

        def wait() -> object:
            return stream.read_watching(-1, -1, time.monotonic() + 0.0002, SPIN_US, 0)

        assert _fastest(wait) < granted + 0.0006
    finally:
        left.close()
        right.close()

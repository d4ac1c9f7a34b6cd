"""Endpoint.run_oneways without I/O: order, the backlog bound, no wait for itself, nothing stranded."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import pytest

from alpc.rpc.endpoint import Endpoint


class _Call:
    def __init__(self, data: bytes) -> None:
        self.data = data


def _endpoint(handle: Any, backlog: int) -> Endpoint:
    # Only what run_oneways uses: the queue, its bound, its token, and the dispatcher's handle.
    made = object.__new__(Endpoint)
    made._oneway_backlog = backlog
    made._oneways = deque()
    made._oneway_runner = threading.Lock()
    made._oneway_thread = None
    made._stranded = False
    made._on_stranded = None
    made._handle = handle
    return made


@pytest.mark.timeout(30)
def test_past_the_backlog_the_receiving_thread_waits_its_turn_and_order_is_kept() -> None:
    ran: list[bytes] = []
    first_runs, go_on = threading.Event(), threading.Event()

    def handle(data: bytes, *, expects_reply: bool) -> None:
        ran.append(data)
        if data == b"0":
            first_runs.set()
            assert go_on.wait(10)

    endpoint = _endpoint(handle, 2)
    endpoint.queue_oneway(_Call(b"0"))  # type: ignore[arg-type]
    runner = threading.Thread(target=endpoint.run_oneways)
    runner.start()
    assert first_runs.wait(10)
    for index in (1, 2):  # within the backlog: queued, and the thread goes back at once
        endpoint.queue_oneway(_Call(str(index).encode()))  # type: ignore[arg-type]
        endpoint.run_oneways()
    endpoint.queue_oneway(_Call(b"3"))  # type: ignore[arg-type]
    waiting = threading.Thread(target=endpoint.run_oneways)  # past it: waits for the runner
    waiting.start()
    waiting.join(0.2)  # not a handshake: a thread that did not wait would have ended by now
    assert waiting.is_alive() and ran == [b"0"]
    go_on.set()
    runner.join(10)
    waiting.join(10)
    assert not waiting.is_alive() and ran == [b"0", b"1", b"2", b"3"]


@pytest.mark.timeout(30)
def test_a_one_way_call_served_inside_one_never_waits_for_itself() -> None:
    ran: list[bytes] = []

    def handle(data: bytes, *, expects_reply: bool) -> None:
        ran.append(data)
        if data == b"outer":  # a call this thread serves while it runs one (nested)
            endpoint.queue_oneway(_Call(b"nested"))  # type: ignore[arg-type]
            endpoint.run_oneways()

    endpoint = _endpoint(handle, 0)
    endpoint.queue_oneway(_Call(b"outer"))  # type: ignore[arg-type]
    endpoint.run_oneways()
    assert ran == [b"outer", b"nested"]


@pytest.mark.timeout(30)
def test_calls_behind_one_that_raised_keyboard_interrupt_go_to_the_next_pass() -> None:
    ran: list[bytes] = []

    def handle(data: bytes, *, expects_reply: bool) -> None:
        ran.append(data)
        if data == b"0":
            raise KeyboardInterrupt

    endpoint = _endpoint(handle, 8)
    stranded: list[Endpoint] = []
    endpoint._on_stranded = stranded.append
    for index in (b"0", b"1", b"2"):
        endpoint.queue_oneway(_Call(index))  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        endpoint.run_oneways()
    assert ran == [b"0"] and stranded == [endpoint]  # the server's next worker pass is told
    endpoint.run_oneways()  # that pass: nothing waits for another call of this client
    assert ran == [b"0", b"1", b"2"] and not endpoint._oneway_runner.locked()

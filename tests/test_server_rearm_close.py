"""ConnectionPort.wait() with Quick-LPC ring clients: the eventfd that wakes a sleeping wait()
to arm a ring again (``_rearm``) is never written once closed.

The test failed before the write and the close took one lock; its docstring says what went wrong."""

from __future__ import annotations

import os
import threading

import pytest

from alpc import _native
from tests.test_qlpc_faults import until
from tests.test_qlpc_server_read_races import multiplexed

native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
pytestmark = [native, pytest.mark.timeout(60)]


def test_rearm_write_racing_close_lands_in_another_file(broker, config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """server.py _quick_unarmed_by reads ``self._rearm`` and writes it outside the port's lock.
    A take on another thread (a handler's pump, here) that read the number just before close()
    freed the set writes after the last waiter closed it (_free_poller): by then the number may
    be another file's, which gets the 8 bytes. (The comment there expects only an OSError.)"""
    name = "rv.rearm.close"
    with multiplexed(config, name) as (port, server, client):
        rearm = port._rearm
        assert rearm is not None

        real_write = os.eventfd_write
        reached, go = threading.Event(), threading.Event()
        taker: list[int] = []

        def write(fd: int, value: int) -> None:
            if taker and threading.get_ident() == taker[0]:
                reached.set()
                go.wait(1)  # (a close() waits for this take to end: keep it short)
            real_write(fd, value)

        monkeypatch.setattr(os, "eventfd_write", write)
        waiter_done: list[object] = []

        def waiter() -> None:
            try:
                port.wait(timeout=10)
            except BaseException as exc:  # ConnectionClosed once the port closes
                waiter_done.append(exc)

        w = threading.Thread(target=waiter, daemon=True)
        w.start()
        until(lambda: bool(port._armed_by))  # the waiter armed the ring and sleeps in poll()

        def take() -> None:
            taker.append(threading.get_ident())
            server.pump()  # a take from the armed ring by another thread: on_take writes _rearm

        t = threading.Thread(target=take, daemon=True)
        t.start()
        assert reached.wait(10)
        client.close()
        port.close()  # the waiter wakes and, last out, frees the set and closes _rearm
        # Unfixed, the waiter closed _rearm meanwhile, the write still to come, and its number
        # could go to another file first; the port now holds that close until the write is over.
        w.join(2)
        mine: list[int] = []
        try:
            if not w.is_alive():
                for _ in range(64):
                    mine.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
                    if mine[-1] == rearm:
                        break
            go.set()
            t.join(10)
            w.join(10)
            assert not w.is_alive() and port._rearm is None
            stray = {}
            for fd in mine:
                try:
                    stray[fd] = os.eventfd_read(fd)
                except BlockingIOError:
                    pass
            assert not stray, f"a closed port's rearm write landed in an unrelated eventfd: {stray}"
        finally:
            go.set()
            for fd in mine:
                os.close(fd)

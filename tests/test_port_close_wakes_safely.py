"""ConnectionPort.close() while another thread waits on the port.

close() marks the port closed, closes the broker link (whose hang-up wakes a waiter), the
requests and the connections, and only then, under the lock, writes the port's eventfd to
wake a thread polling the set. The last waiter to leave frees the set and that eventfd
(``_free_poller``) as soon as it finds the port closed, and the link's hang-up woke it
already: close() then wrote to the freed eventfd's number, a raw ``OSError: [Errno 9]`` out of
close() (the connections closed, the name given back: the caller saw a failure), or, once
another file had the number, 8 bytes written into that file. A stress loop (three threads in
wait(), close() from a fourth) hit it in most rounds.

The window is made deterministic by pausing a real code path: close() right after it closed
the link, until the woken waiter has left.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from fd_reuse import fd_numbered

import alpc
from alpc.transport import wait_readable

pytestmark = pytest.mark.timeout(60)


def test_close_after_the_last_waiter_freed_the_set_writes_to_no_freed_fd(broker: alpc.Broker,
                                                                          config: alpc.Config) -> None:
    port = alpc.create_port("close.race.woken", config=config)
    woken = port._woken
    polling = threading.Event()
    poll = port._poller.wait

    def watched_poll(*args: Any, **kwargs: Any) -> Any:
        polling.set()
        return poll(*args, **kwargs)

    port._poller.wait = watched_poll  # type: ignore[method-assign]
    waited: list[BaseException] = []

    def wait() -> None:
        try:
            port.wait(timeout=20)
        except BaseException as exc:  # handed to the test thread
            waited.append(exc)

    waiter = threading.Thread(target=wait)
    keep: list[int] = []
    link_close = port._link.close

    def close_link_then_let_the_waiter_leave() -> None:
        link_close()
        waiter.join(20)  # woken by the link's hang-up, it found the port closed and left
        fd_numbered(woken, keep)  # the eventfd's number, if freed, goes to the next file opened

    port._link.close = close_link_then_let_the_waiter_leave  # type: ignore[method-assign]
    try:
        waiter.start()
        assert polling.wait(10)
        port.close()  # raises nothing
        assert not waiter.is_alive()
        assert len(waited) == 1 and isinstance(waited[0], alpc.ConnectionClosed), waited
        # Nothing went to the file that has the freed number now.
        assert not wait_readable(keep, 0.0)
    finally:
        waiter.join(20)
        for fd in keep:
            os.close(fd)
        port.close()

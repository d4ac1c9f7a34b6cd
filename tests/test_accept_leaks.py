"""Resource leaks on rare failure paths of a server's accept and wait.

Each test injects an OS failure that cannot be provoked on demand (epoll out of memory,
a close() from another thread at an exact moment) and checks that nothing the accept or
the wait held stays open, and that the peer gets a typed answer promptly.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fd_reuse import connect_in_thread, fd_numbered

import alpc
import alpc.qlpc
import alpc.server

pytestmark = pytest.mark.timeout(60)

# Far below any timeout a stuck peer would wait out.
PROMPT = 3.0


def _fd_targets() -> dict[int, str]:
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own fd
    return targets




@pytest.mark.parametrize("quick_lpc", [False, True])
def test_an_accept_whose_epoll_register_fails_closes_what_it_built(broker: alpc.Broker, config: alpc.Config,
                                                                    quick_lpc: bool) -> None:
    """ConnectionRequest.accept() built the channel (socket, peer pidfd, Quick-LPC rings) and
    then _adopt failed to watch its fds (epoll_ctl ENOSPC: max_user_watches, or ENOMEM).
    The connection was already counted among the port's and nobody closed it: its fds stayed
    open until the port closed, it counted toward max_connections, and its client, told it
    was accepted, waited out its whole timeout on a server that never reads."""
    attributes = alpc.PortAttributes(quick_lpc=quick_lpc)
    with alpc.create_port("svc.leaks.adopt", attributes, config=config) as port:
        real_register = port._poller.register

        def register(fd: int) -> None:
            raise OSError(errno.ENOSPC, "injected: No space left on device (max_user_watches)")

        port._poller.register = register  # type: ignore[method-assign]
        thread, outcome = connect_in_thread(config, "svc.leaks.adopt")
        try:
            request = port.listen(timeout=10)
            with pytest.raises(OSError):
                request.accept()
            assert outcome["connected"].wait(10)
            assert "connect_error" not in outcome, outcome
            assert outcome["quick"] == (quick_lpc and alpc.qlpc.available())  # the rings were built too
            thread.join(PROMPT + 10)
            assert not thread.is_alive()
            # The client hears promptly that the connection is gone (a typed error).
            assert isinstance(outcome.get("error"), (alpc.ConnectionClosed, alpc.PeerGone)), outcome
            assert outcome["took"] < PROMPT
            assert port.connections == []
            # (Its fds: the leak check of conftest.py, once the in-process broker let go of its copies.)
        finally:
            port._poller.register = real_register  # type: ignore[method-assign]
            thread.join(20)




def _pause_first_call(target: object, attribute: str) -> tuple[threading.Event, threading.Event, Callable[[], None]]:
    """Patch ``target.attribute`` so that its first call stops until released: (reached, release, undo)."""
    reached, release = threading.Event(), threading.Event()
    real: Callable[..., object] = getattr(target, attribute)

    def paused(*args: Any, **kwargs: Any) -> object:
        if not reached.is_set():
            reached.set()
            release.wait(20)
        return real(*args, **kwargs)

    setattr(target, attribute, paused)
    return reached, release, lambda: setattr(target, attribute, real)


def test_close_while_wait_is_about_to_poll_the_port_set(runtime_dir: Path, config: alpc.Config) -> None:
    """wait() polls the port's epoll fd without the port's lock; a close() from another thread
    closed it under the lock (the fix of ab2aa42 holds only the broker link's fd). The number
    went to the next file opened (here a pipe nobody writes) and wait() slept on it for its
    whole timeout (for ever with timeout=None) instead of raising ConnectionClosed at once.
    Here the port lost its registration for good (the broker stopped, reregister_timeout=0),
    so no link fd wakes the waiter either: a port serving on after losing its name."""
    with alpc.Broker(runtime_dir):
        port = alpc.create_port("svc.leaks.wait", config=config, reregister_timeout=0)
    outcome: dict[str, object] = {}
    keep: list[int] = []
    thread = None
    try:
        with pytest.raises(alpc.BrokerUnavailable):
            port.wait(timeout=10)  # reported once; then it serves its connections on
    except BaseException:
        port.close()
        raise
    reached, release, undo = _pause_first_call(port._poller, "wait")
    try:

        def waiter() -> None:
            started = time.monotonic()
            try:
                port.wait(timeout=10)
            except BaseException as exc:  # handed to the test thread
                outcome["error"] = exc
            outcome["took"] = time.monotonic() - started

        thread = threading.Thread(target=waiter)
        thread.start()
        assert reached.wait(10)
        number = port._poller.fileno()
        port.close()
        fd_numbered(number, keep)  # the number is free again only if close() let it go
        release.set()
        thread.join(20)
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), alpc.ConnectionClosed), outcome
        assert outcome["took"] < PROMPT
    finally:
        release.set()
        if thread is not None:
            thread.join(20)
        undo()
        for fd in keep:
            os.close(fd)
        port.close()


def test_a_port_that_cannot_build_its_poll_set_closes_its_link(broker: alpc.Broker, config: alpc.Config,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """create_port() registered the name, then building the port's epoll set failed (EMFILE:
    the fd table full; ENOMEM): the registration was never closed. Its socket went with the
    garbage collector (the name came back only then), its two eventfds never: each failure
    left two more fds open, in a process already short of them."""
    before = _fd_targets()

    def poller() -> None:
        raise OSError(errno.EMFILE, "injected: Too many open files")

    monkeypatch.setattr(alpc.server, "Poller", poller)
    with pytest.raises(OSError):
        alpc.create_port("svc.leaks.create", config=config)
    monkeypatch.undo()
    # The link's eventfds (its socket goes with the garbage collector, and the in-process
    # broker closes its own end in its own time).
    leaked = {fd: target for fd, target in _fd_targets().items() if fd not in before and "eventfd" in target}
    assert leaked == {}
    with alpc.create_port("svc.leaks.create", config=config, timeout=5) as port:  # the name is back
        assert port.registered

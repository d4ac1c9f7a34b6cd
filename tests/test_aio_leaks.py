"""asyncio listen() and a close() from another thread: the loop must never be
left watching a link fd number that close() freed (and the next file opened took)."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from typing import Any

import pytest
from fd_reuse import connect_in_thread

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)

PROMPT = 3.0


def _socket_numbered(number: int, keep: list[socket.socket]) -> socket.socket | None:
    """Open socket pairs (kept in ``keep``) until one end gets fd ``number``: that end, or None."""
    for _ in range(64):
        a, b = socket.socketpair()
        keep.extend((a, b))
        for end in (a, b):
            if end.fileno() == number:
                return end
        if min(a.fileno(), b.fileno()) > number:
            return None
    return None


@pytest.mark.parametrize("reused", [False, True])
def test_close_while_listen_is_about_to_watch_the_link(broker: alpc.Broker, config: alpc.Config,
                                                        reused: bool) -> None:
    """AsyncConnectionPort.listen() took the link's fds under the port's lock, then had the loop
    watch them without holding them; aclose() runs the port's close() in an executor thread,
    which freed them in between. The loop then watched a closed fd (listen raised a bare
    OSError EBADF instead of ConnectionClosed) or, once the number went to the next file
    opened, replaced that file's reader with listen's and then removed it: whoever watched
    that file on the loop never heard from it again."""

    async def main() -> dict[str, Any]:
        outcome: dict[str, Any] = {}
        port = await aio.create_port("svc.leaks.alisten", config=config)
        inner = port._port
        loop = asyncio.get_running_loop()
        real_add_reader = loop.add_reader
        keep: list[socket.socket] = []
        theirs: dict[str, Any] = {"heard": asyncio.Event()}

        def add_reader(fd: int, callback: Any, *args: Any) -> None:
            loop.add_reader = real_add_reader  # type: ignore[method-assign]
            # aclose()'s executor thread runs the port's close() right now.
            closer = threading.Thread(target=inner.close)
            closer.start()
            closer.join(10)
            if reused:
                mine = _socket_numbered(fd, keep)  # free again only if close() let it go
                if mine is not None:
                    # Another user of the loop watches the file that got the number.
                    real_add_reader(fd, theirs["heard"].set)
                    theirs["mine"], theirs["peer"] = mine, keep[keep.index(mine) ^ 1]
            real_add_reader(fd, callback, *args)

        loop.add_reader = add_reader  # type: ignore[method-assign]
        started = time.monotonic()
        try:
            await port.listen(timeout=10)
        except BaseException as exc:  # examined by the test
            outcome["error"] = exc
        outcome["took"] = time.monotonic() - started
        loop.add_reader = real_add_reader  # type: ignore[method-assign]
        try:
            if "peer" in theirs:
                theirs["peer"].send(b"x")
                try:
                    await asyncio.wait_for(theirs["heard"].wait(), PROMPT)
                    outcome["theirs"] = "heard"
                except TimeoutError:
                    outcome["theirs"] = "never heard"
                loop.remove_reader(theirs["mine"])
        finally:
            await port.close()
            for sock in keep:
                sock.close()
        return outcome

    outcome = asyncio.run(main())
    assert isinstance(outcome.get("error"), alpc.ConnectionClosed), outcome
    assert outcome["took"] < PROMPT
    assert outcome.get("theirs", "heard") == "heard", outcome


def test_an_async_accept_whose_loop_cannot_watch_it_closes_what_it_built(broker: alpc.Broker,
                                                                         config: alpc.Config) -> None:
    """AsyncConnectionRequest.accept() answered the client and built the channel, then the
    AsyncCommunicationPort's add_reader failed (epoll_ctl ENOSPC past max_user_watches, or
    ENOMEM): the socket and the client's pidfd stayed open for good (nobody held them any
    more), and the client, told it was accepted, waited out its whole timeout."""
    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        real_add_reader = loop.add_reader
        async with await aio.create_port("svc.leaks.aaccept", config=config) as port:
            thread, outcome = connect_in_thread(config, "svc.leaks.aaccept")
            try:
                request = await port.listen(timeout=10)

                def add_reader(fd: int, callback: Any, *args: Any) -> None:
                    loop.add_reader = real_add_reader  # type: ignore[method-assign]
                    raise OSError(errno.ENOSPC, "injected: No space left on device (max_user_watches)")

                loop.add_reader = add_reader  # type: ignore[method-assign]
                with pytest.raises(OSError):
                    await request.accept()
                loop.add_reader = real_add_reader  # type: ignore[method-assign]
                await loop.run_in_executor(None, thread.join, PROMPT + 10)
                assert not thread.is_alive()
                # (Its fds: the leak check of conftest.py, once the in-process broker let go of its copies.)
            finally:
                loop.add_reader = real_add_reader  # type: ignore[method-assign]
                await loop.run_in_executor(None, thread.join, 20)
        return outcome

    outcome = asyncio.run(main())
    assert "connect_error" not in outcome, outcome
    # The client hears promptly that the connection is gone (a typed error).
    assert isinstance(outcome.get("error"), (alpc.ConnectionClosed, alpc.PeerGone)), outcome
    assert outcome["took"] < PROMPT

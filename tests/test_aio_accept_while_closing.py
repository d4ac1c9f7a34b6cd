"""AsyncConnectionPort.close() while an accept() of one of its requests is finishing.

close() closes the connections accepted so far (a snapshot of ``_accepted``), then runs the
blocking port's close() in an executor thread. An accept() whose reply was written meanwhile
went on as soon as that thread had not yet marked the blocking port closed (its only check):
it recorded its connection after close() had taken its snapshot, and close() returned with
that connection open for good: its client never heard PORT_CLOSED, and its socket, pidfd and
sections stayed (nobody would close them: the port was gone). README: "``port.close()``
closes every connection the port accepted (by ``serve()`` or by ``listen()``/``accept()``)".

The window is made deterministic by pausing a real code path: the executor job that closes
the blocking port, before it starts (an executor busy for a moment).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from async_steps import in_thread

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)


def test_an_accept_finishing_while_the_port_closes_is_closed_with_it(broker: alpc.Broker,
                                                                      config: alpc.Config) -> None:
    name = "close.race.aio.accept"

    def client() -> BaseException | alpc.Message:
        try:
            comm = alpc.connect(name, config=config, timeout=10)
        except BaseException as exc:  # handed to the test
            return exc
        try:
            return comm.receive(timeout=10)
        except BaseException as exc:
            return exc
        finally:
            comm.close()

    async def main() -> tuple[object, object]:
        port = await aio.create_port(name, config=config, timeout=10)
        inner = port._port
        closing, go_on = threading.Event(), threading.Event()
        close_inner = inner.close

        def paused_close() -> None:
            closing.set()
            go_on.wait(20)
            close_inner()

        inner.close = paused_close  # type: ignore[method-assign]
        connecting = asyncio.ensure_future(in_thread(client))
        closer: asyncio.Task[None] | None = None
        comm: aio.AsyncCommunicationPort | None = None
        try:
            request = await port.listen(timeout=10)
            closer = asyncio.create_task(port.close())
            assert await in_thread(closing.wait, 10)  # close() closed what was accepted so far
            try:
                comm = await request.accept()
                accepted: object = comm
            except alpc.ConnectionClosed as exc:
                accepted = exc  # the port is closing: as good an answer
            go_on.set()
            await closer
            # Whichever way the accept ended, nothing it made outlives the port's close().
            still_open = comm is not None and not comm.closed
            return (accepted if not still_open else "open after close()"), await connecting
        finally:
            go_on.set()
            if closer is not None:
                await asyncio.gather(closer, return_exceptions=True)
            if comm is not None:
                await comm.close()
            inner.close = close_inner  # type: ignore[method-assign]
            await port.close()
            await asyncio.gather(connecting, return_exceptions=True)

    accepted, heard = asyncio.run(main())
    assert accepted != "open after close()"
    # Its client heard an orderly close (PORT_CLOSED): not a hang, nor a hang-up ("died").
    assert isinstance(heard, alpc.PeerGone) and "closed its port" in str(heard), heard

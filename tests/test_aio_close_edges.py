"""An asyncio port's own close(): what the other calls on it hear, from which thread or loop
it may run, and a close() that is itself cancelled.

- close() flushes what is queued first (up to its ``timeout``); when that flush timed out, the
  connection was failed as PeerGone ("the peer stopped reading"), so every other task of this
  side awaiting a send or receive on it heard that the *peer* went away (and an application
  that reconnects on PeerGone did so) though this side closed it itself. The blocking close()
  ends the other threads' calls with a plain ConnectionClosed.
- close() from a thread whose loop is not the port's, while the port's loop runs: it resolved
  that loop's futures from the wrong thread (no wake-up of its selector), so a task awaiting
  ``receive()`` there never woke. It is refused now (RuntimeError, nothing changed), as every
  other call is; ``asyncio.run_coroutine_threadsafe(comm.close(), loop)`` is the way.
- close() after the port's loop ended (allowed: the only way to let go of such a port) with
  bytes still queued for that loop: RuntimeError "Event loop is closed" out of add_writer,
  nothing released; and AsyncConnectionPort.close() ran its executor job on the dead loop.
- close() cancelled while it flushes (``async with`` whose body was cancelled, then cancelled
  again; asyncio.run's shutdown): the connection stayed open, its socket and pidfd too, and the
  peer heard nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from async_steps import LOOPS, in_thread, until

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
# Inline bodies of 1 MiB: more than the socket's buffer, so a send waits for room.
STALLING = alpc.PortAttributes(inline_threshold=4 * MIB)


async def _stalled_pair(name: str, config: alpc.Config) -> tuple[aio.AsyncConnectionPort, aio.AsyncCommunicationPort,
                                                                  alpc.CommunicationPort, asyncio.Task[None]]:
    """(port, server side, a blocking client that reads only when asked, a send of 1 MiB
    waiting for room in the socket)."""
    port = await aio.create_port(name, STALLING, config=config, timeout=10)
    connecting = asyncio.ensure_future(in_thread(lambda: alpc.connect(name, config=config, timeout=10)))
    comm = await (await port.listen(timeout=10)).accept()
    client = await connecting
    send = asyncio.create_task(comm.send(bytes(MIB), timeout=30))
    await until(lambda: bool(comm._unsent), "the send waits for room in the socket")
    return port, comm, client, send


def test_close_whose_flush_times_out_ends_the_others_as_closed_not_peer_gone(broker: alpc.Broker,
                                                                              config: alpc.Config) -> None:
    name = "aio.close.flush"

    async def main() -> None:
        port, comm, client, send = await _stalled_pair(name, config)
        receive = asyncio.create_task(comm.receive(timeout=30))
        try:
            await asyncio.sleep(0)  # handshake-free: one loop turn, so the receive task starts waiting
            await comm.close(timeout=0)  # the flush gives up at once: the client reads nothing
            for task in (send, receive):
                with pytest.raises(alpc.ConnectionClosed) as ended:
                    await asyncio.wait_for(task, 5)
                assert not isinstance(ended.value, alpc.PeerGone), f"this side closed it, not the peer: {ended.value!r}"
        finally:
            for task in (send, receive):
                task.cancel()
            await asyncio.gather(send, receive, return_exceptions=True)
            client.close()
            await port.close()

    asyncio.run(main())


def test_close_from_another_thread_while_the_ports_loop_runs_is_refused(broker: alpc.Broker,
                                                                         config: alpc.Config) -> None:
    name = "aio.close.thread"
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(20)

    async def open_pair() -> tuple[aio.AsyncConnectionPort, aio.AsyncCommunicationPort, alpc.CommunicationPort]:
        port = await aio.create_port(name, config=config, timeout=10)
        connecting = asyncio.ensure_future(in_thread(lambda: alpc.connect(name, config=config, timeout=10)))
        comm = await (await port.listen(timeout=10)).accept()
        return port, comm, await connecting

    port, comm, client = on_loop(open_pair())
    try:
        receiving = asyncio.run_coroutine_threadsafe(comm.receive(), loop)
        on_loop(until(lambda: bool(comm._inbox_waiters), "the receive waits"))

        async def close_here() -> None:
            await comm.close()

        with pytest.raises(RuntimeError, match="another event loop or thread"):
            asyncio.run(close_here())
        # Refused before anything changed: the port's own task still gets its message.
        assert not comm.closed
        client.send(b"after", timeout=5)
        assert receiving.result(10).data == b"after"
        on_loop(comm.close())
        with pytest.raises(alpc.ConnectionClosed, match="closed its port"):
            client.receive(timeout=10)
    finally:
        if not comm.closed:
            on_loop(comm.close())
        client.close()
        on_loop(port.close())
        loop.call_soon_threadsafe(loop.stop)
        runner.join(20)
        loop.close()


def _runner(loop: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """asyncio.run, on the stock loop or on uvloop's."""
    if loop != "uvloop":
        return asyncio.run
    uvloop = pytest.importorskip("uvloop")

    def run(main: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return run


@pytest.mark.parametrize("loop", LOOPS)
def test_close_after_the_ports_loop_ended_flushes_and_releases(loop: str, broker: alpc.Broker,
                                                               config: alpc.Config) -> None:
    name = f"aio.close.ended.{loop}"
    run = _runner(loop)

    async def open_stalled() -> tuple[aio.AsyncConnectionPort, aio.AsyncCommunicationPort, alpc.CommunicationPort]:
        port, comm, client, _ = await _stalled_pair(name, config)
        return port, comm, client  # asyncio.run cancels the send: its bytes stay queued

    port, comm, client = run(open_stalled())
    got: list[object] = []

    def read() -> None:
        for _ in range(2):
            try:
                got.append(client.receive(timeout=10))
            except alpc.AlpcError as exc:
                got.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        async def close_later() -> None:
            await comm.close(timeout=10)
            await port.close()

        run(close_later())
    finally:
        reader.join(20)
        client.close()
    assert comm.closed and comm._stream.closed
    first, second = got
    assert isinstance(first, alpc.Message) and len(first.data) == MIB, first
    assert isinstance(second, alpc.ConnectionClosed) and "closed its port" in str(second), second
    # The port's name was given back.
    with pytest.raises(alpc.PortNotFound):
        alpc.connect(name, config=config, timeout=5)


def test_async_with_cancelled_twice_still_closes(broker: alpc.Broker, config: alpc.Config) -> None:
    name = "aio.close.cancelled"

    async def main() -> None:
        port, comm, client, send = await _stalled_pair(name, config)
        closing = asyncio.Event()
        real_close = comm.close

        async def close(timeout: float | None = 1.0) -> None:
            closing.set()
            await real_close(30)  # a flush that waits: the client does not read

        comm.close = close  # type: ignore[method-assign]

        async def body() -> None:
            async with comm:
                await send

        task = asyncio.create_task(body())
        try:
            await asyncio.sleep(0)  # handshake-free: one loop turn, so the body starts its send
            task.cancel()  # the body: __aexit__ closes the port, flushing first
            await until(closing.is_set, "__aexit__ closes the port")
            await asyncio.sleep(0)  # handshake-free: one loop turn, so close() enters its flush
            task.cancel()  # the close itself (a second cancel, asyncio.run's shutdown)
            await asyncio.gather(task, return_exceptions=True)
            assert comm.closed, "a cancelled close() left the connection open"
            assert comm._stream.closed and comm.peer_pidfd is None
            with pytest.raises(alpc.AlpcError) as ended:  # the frame was cut: no PORT_CLOSED can follow it
                await in_thread(lambda: [client.receive(timeout=10) for _ in range(2)])
            assert not isinstance(ended.value, alpc.Timeout), ended.value
        finally:
            task.cancel()
            await asyncio.gather(task, send, return_exceptions=True)
            client.close()
            await port.close()

    asyncio.run(main())


def test_port_close_cancelled_while_its_connections_flush_still_closes_the_port(broker: alpc.Broker,
                                                                                config: alpc.Config) -> None:
    """AsyncConnectionPort.close() cancelled while a connection flushes (``async with`` port whose
    body was cancelled twice, asyncio.run's shutdown): the port's name stayed registered and its
    connections open, for nobody to close."""
    name = "aio.close.port.cancelled"

    async def main() -> None:
        port, comm, client, send = await _stalled_pair(name, config)
        flushing = asyncio.Event()
        real_close = comm.close

        async def close(timeout: float | None = 1.0) -> None:
            flushing.set()
            await real_close(30)  # a flush that waits: the client does not read

        comm.close = close  # type: ignore[method-assign]
        closing = asyncio.create_task(port.close())
        try:
            await until(flushing.is_set, "the port's close() flushes the stalled connection")
            closing.cancel()
            await asyncio.gather(closing, return_exceptions=True)
            assert comm.closed and comm._stream.closed
            with pytest.raises(alpc.PortNotFound):
                await in_thread(lambda: alpc.connect(name, config=config, timeout=5))
        finally:
            closing.cancel()
            send.cancel()
            await asyncio.gather(closing, send, return_exceptions=True)
            client.close()
            await port.close()

    asyncio.run(main())

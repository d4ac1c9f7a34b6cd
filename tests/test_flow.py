"""Cancel, deadlines, batching, the asyncio API and the completion port, with real server processes."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest
from async_steps import LOOPS, run_on

import alpc
from alpc import aio

FLOW_PEERS = Path(__file__).resolve().parent / "flow_peers.py"


@pytest.fixture
def flow(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(role: str, name: str, *args: str):  # type: ignore[no-untyped-def]
        peer = spawn.argv([sys.executable, str(FLOW_PEERS), role, name, "--runtime-dir", str(runtime_dir), *args])
        peer.expect("READY")
        return peer
    return start


def test_a_request_cancelled_from_another_thread_reaches_the_handler(broker, config, flow) -> None:  # type: ignore[no-untyped-def]
    server = flow("watch", "flow.cancel")
    with alpc.connect("flow.cancel", config=config, timeout=10) as comm:
        pending = comm.start_request(b"slow")
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                pending.result(timeout=10)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        server.expect("GOT slow")
        assert pending.cancel()
        waiter.join(10)
        assert outcome and isinstance(outcome[0], alpc.Cancelled)
        server.expect("SAW_CANCEL")
        assert not pending.cancel()  # not in flight any more
        # The handler's late reply was dropped by its runtime; the next reply is the right one.
        assert comm.request(b"next", timeout=10).data == b"NEXT"


def test_a_timeout_cancels_the_request_at_the_server(broker, config, flow) -> None:  # type: ignore[no-untyped-def]
    server = flow("watch", "flow.timeout")
    with alpc.connect("flow.timeout", config=config, timeout=10) as comm:
        with pytest.raises(alpc.Timeout):
            comm.request(b"slow", timeout=0.3)
        server.expect("SAW_CANCEL")
        assert comm.request(b"after", timeout=10).data == b"AFTER"


def test_a_request_past_its_deadline_is_never_dispatched(broker, config, flow) -> None:  # type: ignore[no-untyped-def]
    server = flow("watch", "flow.deadline")
    with alpc.connect("flow.deadline", config=config, timeout=10) as comm:
        held = comm.start_request(b"hold")
        server.expect("GOT hold")
        late = comm.start_request(b"expires", deadline=time.monotonic() + 0.2)
        with pytest.raises(alpc.DeadlineExceeded):
            late.result(timeout=10)
        server.send("go")  # the handler of "hold" returns; "expires" is due next, but too late
        assert held.result(timeout=10).data == b"held"
        assert comm.request(b"carried", timeout=10, deadline=time.monotonic() + 10).data == b"CARRIED"
        assert server.expect("GOT") == ["carried", "deadline"]


def test_batched_datagrams_arrive_all_and_in_order(broker, config, flow) -> None:  # type: ignore[no-untyped-def]
    server = flow("watch", "flow.batch")
    with alpc.connect("flow.batch", config=config, timeout=10) as comm:
        comm.send_many((str(n).encode() for n in range(1, 2001)), timeout=10)
        for n in range(2001, 2101):
            comm.send(str(n).encode(), flush=False)
        # A request flushes what was queued before it.
        assert comm.request(b"count", timeout=10).data == b"2100"
        comm.send(b"2101", flush=False)
        comm.flush(timeout=10)
        assert comm.request(b"count", timeout=10).data == b"2101"
    server.expect("PORT_CLOSED")


@pytest.mark.parametrize("loop", LOOPS)
def test_asyncio_client_request_cancel_and_batch(broker, config, flow, loop) -> None:  # type: ignore[no-untyped-def]
    server = flow("watch", "flow.aio")

    async def main() -> None:
        async with await aio.connect("flow.aio", config=config, timeout=10) as comm:
            assert (await comm.request(b"hello", timeout=10)).data == b"HELLO"
            task = asyncio.create_task(comm.request(b"slow", timeout=10))
            await asyncio.get_running_loop().run_in_executor(None, server.expect, "GOT slow")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.get_running_loop().run_in_executor(None, server.expect, "SAW_CANCEL")
            await comm.send_many([str(n).encode() for n in range(1, 501)], timeout=10)
            assert (await comm.request(b"count", timeout=10)).data == b"500"
            big = b"abcdefgh" * 65536  # through a section
            assert (await comm.request(big, timeout=10)).data == big.upper()
            with pytest.raises(alpc.Timeout):
                await comm.request(b"slow", timeout=0.2)
            await asyncio.get_running_loop().run_in_executor(None, server.expect, "SAW_CANCEL")

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_asyncio_server_cancels_the_handler_task(broker, config, flow, loop) -> None:  # type: ignore[no-untyped-def]
    server = flow("async", "flow.aserve", "--loop", loop)
    with alpc.connect("flow.aserve", config=config, timeout=10) as comm:
        assert comm.request(b"ping", timeout=10).data == b"PING"
        with pytest.raises(alpc.Timeout):
            comm.request(b"slow", timeout=0.3)
        server.expect("CANCELLED_ERROR")
        for _ in range(300):
            comm.send(b"d", flush=False)
        assert comm.request(b"count", timeout=10).data == b"300"
        views = [comm.request(bytes([n]) * 100_000, timeout=10).data for n in (97, 98)]
        assert views == [b"A" * 100_000, b"B" * 100_000]


@pytest.mark.parametrize("loop", LOOPS)
def test_asyncio_listen_receive_reply_in_process(broker, config, loop) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await aio.create_port("flow.inproc", config=config) as port:
            loop = asyncio.get_running_loop()
            client = loop.run_in_executor(None, lambda: alpc.connect("flow.inproc", config=config, timeout=10))
            request = await port.listen(timeout=10)
            comm = await request.accept()
            blocking = await client
            answer = loop.run_in_executor(None, lambda: blocking.request(b"x" * 1000, timeout=10))
            message = await comm.receive(timeout=10)
            view = await comm.create_view(1000)
            view.memory[:] = message.data.upper()
            await message.reply(view)
            assert (await answer).data == b"X" * 1000
            await loop.run_in_executor(None, blocking.close)
            notices = [m.type async for m in comm]
            assert notices == [alpc.MessageType.PORT_CLOSED]
            await comm.close()

    run_on(loop, main)


@pytest.mark.parametrize("ordered", [False, True])
def test_completion_port_serves_many_clients_and_sees_cancels(broker, config, flow, ordered) -> None:  # type: ignore[no-untyped-def]
    server = flow("completion", "flow.iocp", "--workers", "3", *(["--ordered"] if ordered else []))
    clients = [alpc.connect("flow.iocp", config=config, timeout=10) for _ in range(12)]
    try:
        errors: list[BaseException] = []

        def hammer(comm: alpc.CommunicationPort, index: int) -> None:
            try:
                for n in range(40):
                    text = f"order:{index}-{n}".encode()
                    assert comm.request(text, timeout=10).data == text[6:]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=hammer, args=(comm, i)) for i, comm in enumerate(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors
        with pytest.raises(alpc.Timeout):
            clients[0].request(b"slow", timeout=0.3)
        server.expect("GOT slow")
        server.expect("SAW_CANCEL")
        if ordered:
            # One at a time per client: pipelined requests come back in order.
            pending = [clients[1].start_request(f"order:{n}".encode()) for n in range(20)]
            assert [p.result(timeout=10).data for p in pending] == [str(n).encode() for n in range(20)]
    finally:
        for comm in clients:
            comm.close()


def test_completion_port_with_an_async_handler_in_process(broker, config) -> None:  # type: ignore[no-untyped-def]
    started = threading.Event()
    cancelled = threading.Event()

    async def handle(message: alpc.Message) -> bytes:
        if message.data == b"slow":
            started.set()
            try:
                await asyncio.sleep(30)  # handshake-free: stands for a slow handler, ended by the cancel under test
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return message.data[::-1]

    with alpc.create_port("flow.aiocp", config=config) as port:
        completion = alpc.CompletionPort(port, handle, max_workers=8)
        loop_thread = threading.Thread(target=completion.serve, kwargs={"timeout": 30})
        loop_thread.start()
        try:
            with alpc.connect("flow.aiocp", config=config, timeout=10) as comm:
                pending = [comm.start_request(f"{n}ab".encode()) for n in range(30)]
                assert [p.result(timeout=10).data for p in pending] == [f"{n}ab".encode()[::-1] for n in range(30)]
                slow = comm.start_request(b"slow")
                assert started.wait(10)
                slow.cancel()
                assert cancelled.wait(10)
        finally:
            completion.stop()
            loop_thread.join(10)


def test_completion_port_pool_grows_with_blocked_handlers_and_shrinks_when_idle(broker, config) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()
    inside = threading.Semaphore(0)

    def handle(message: alpc.Message) -> bytes:
        if message.data == b"block":
            inside.release()
            release.wait(10)
        return message.data

    with alpc.create_port("flow.pool", config=config) as port:
        completion = alpc.CompletionPort(port, handle, max_workers=3, min_workers=1, idle_timeout=0.2)
        loop_thread = threading.Thread(target=completion.serve, kwargs={"timeout": 30})
        loop_thread.start()
        try:
            with alpc.connect("flow.pool", config=config, timeout=10) as comm:
                blocked = [comm.start_request(b"block") for _ in range(3)]
                for _ in range(3):
                    assert inside.acquire(timeout=10)  # three handlers run at once: the pool grew
                assert completion.workers == 3
                release.set()
                assert [p.result(timeout=10).data for p in blocked] == [b"block"] * 3
                deadline = time.monotonic() + 10
                while completion.workers > 1:
                    assert time.monotonic() < deadline, completion.workers
                    time.sleep(0.02)  # handshake-free: waits out the pool's idle_timeout, bounded
                assert comm.request(b"again", timeout=10).data == b"again"
        finally:
            completion.stop()
            loop_thread.join(10)


def test_a_signal_interrupts_a_request_blocked_on_the_socket(broker, config, flow) -> None:  # type: ignore[no-untyped-def]
    import signal

    class Alarm(Exception):
        pass

    def ring(*_: object) -> None:
        raise Alarm

    server = flow("watch", "flow.signal")
    previous = signal.signal(signal.SIGALRM, ring)
    try:
        with alpc.connect("flow.signal", config=config, timeout=10) as comm:
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Alarm):
                comm.request(b"hold", timeout=30)
            assert time.monotonic() - started < 5
            server.expect("GOT hold")
            server.send("go")
            assert comm.request(b"next", timeout=10).data == b"NEXT"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_datagrams_whose_write_timed_out_unsent_hold_no_slot_in_the_peers_window(broker, config) -> None:  # type: ignore[no-untyped-def]
    """The server never reads, so the client's socket fills; every send that then times out
    with nothing written (inline, batched, through a section) must give back the window slot it
    took, or a slow reader would shrink a producer's window for good, one timeout at a time."""
    with alpc.create_port("svc.slow", config=config) as port:
        connected: list[alpc.CommunicationPort] = []
        connecting = threading.Thread(target=lambda: connected.append(
            alpc.connect("svc.slow", config=config, timeout=10)))
        connecting.start()
        server = port.listen(timeout=10).accept()
        connecting.join(10)
        (client,) = connected
        try:
            flow = client._core.channel.flow  # what the client believes the server holds of its datagrams
            sent = 0
            while True:
                try:
                    client.send(b"d" * 200, timeout=0.05)
                except alpc.Timeout:
                    break
                sent += 1
            assert 0 < sent < 1000 and flow.datagrams_out == sent
            for attempt in (lambda: client.send(b"d" * 200, timeout=0.02),
                            lambda: client.send_many([b"d" * 200] * 8, timeout=0.02),
                            lambda: client.send(b"s" * 4096, timeout=0.02)):  # a section datagram
                with pytest.raises(alpc.Timeout):
                    attempt()
                assert not client.closed
                assert flow.datagrams_out == sent
        finally:
            client.close()
            server.close()

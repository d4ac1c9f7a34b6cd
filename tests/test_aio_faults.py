"""Cancels and timeouts at awkward points of alpc.aio and the completion port.

Each test states the behaviour a user may rely on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from async_steps import in_thread, until

import alpc
from alpc import aio

FAULT_PEERS = Path(__file__).resolve().parent / "aio_fault_peers.py"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def peer(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(role: str, name: str, *args: str):  # type: ignore[no-untyped-def]
        started = spawn.argv([sys.executable, str(FAULT_PEERS), role, name, "--runtime-dir", str(runtime_dir), *args])
        started.expect("READY")
        return started
    return start


# -- a section send cancelled while its frame waits in the write queue -------------------


def test_cancelled_section_send_whose_frame_is_queued_is_delivered_intact(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """A task cancelled while its large datagram's notification sits in the write queue:
    the frame still goes out (aio._write queued it), so the section range it names must
    stay the sender's until the peer releases it. aio._send_section instead hands the
    range back (section_sent(view, written=False)): the next large message reuses it, the
    peer reads B's bytes under A's notification, and B's re-announcement of the section
    is a protocol error at the peer, which drops the connection."""
    server = peer("hold", "fault.section")

    async def main() -> tuple[list[list[str]], bytes | BaseException]:
        comm = await aio.connect("fault.section", config=config, timeout=10)
        try:
            await in_thread(server.expect, "ACCEPTED")
            # A small send buffer, so the write of the queued batch below stays partial
            # while the server does not read (it waits for "read").
            comm._stream._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            for _ in range(100):
                await comm.send(b"s" * 200, flush=False)  # 20 KB owed: rides with the next write
            first = asyncio.create_task(comm.send(b"A" * 100_000, timeout=10))
            await until(lambda: bool(comm._unsent), "the write of A to be queued")
            assert not first.done()
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            second = asyncio.create_task(comm.send(b"B" * 100_000, timeout=10))
            for _ in range(5):  # loop turns, not time: B's first step reserves and fills its range
                await asyncio.sleep(0)  # handshake-free: one loop turn, not a wait
            assert not second.done()  # it waits behind the queued bytes
            server.send("read")
            await asyncio.wait_for(second, 10)
            seen = [await in_thread(server.expect, "BIG")]
            try:
                answer: bytes | BaseException = (await comm.request(b"ping", timeout=10)).data
            except alpc.ConnectionClosed as exc:
                answer = exc
            if seen[0][0] == "A":
                seen.append(await in_thread(server.expect, "BIG"))
            return seen, answer
        finally:
            await comm.close()

    seen, answer = asyncio.run(main())
    # A's frame was queued, so it goes out: the server must see A's own bytes under it
    # (and then B), and the connection must survive.
    assert [entry[:2] for entry in seen] == [["A", "uniform"], ["B", "uniform"]], (seen, server.stderr())
    assert answer == b"PING", (answer, server.stderr())


def test_control_uncancelled_section_send_behind_a_partial_write(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """Control for the test above: the same queue, nothing cancelled."""
    server = peer("hold", "fault.section2")

    async def main() -> list[list[str]]:
        comm = await aio.connect("fault.section2", config=config, timeout=10)
        try:
            await in_thread(server.expect, "ACCEPTED")
            comm._stream._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            for _ in range(100):
                await comm.send(b"s" * 200, flush=False)
            first = asyncio.create_task(comm.send(b"A" * 100_000, timeout=10))
            await until(lambda: bool(comm._unsent), "the write of A to be queued")
            server.send("read")
            await asyncio.wait_for(first, 10)
            await comm.send(b"B" * 100_000, timeout=10)
            return [await in_thread(server.expect, "BIG"), await in_thread(server.expect, "BIG")]
        finally:
            await comm.close()

    seen = asyncio.run(main())
    assert [entry[:2] for entry in seen] == [["A", "uniform"], ["B", "uniform"]], seen
    server.expect("PORT_CLOSED")


# -- connect / create_port cancelled while their handshake runs in the executor ----------


def test_cancelled_aio_connect_leaves_no_connection_behind(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """Cancel aio.connect while the server holds the connect request; the server then
    accepts. The cancel ends the handshake in the executor at once (its stream shut down):
    nothing it opened may outlive the cancelled call (the leak check counts fds), and the
    server's accept must find the client gone (PeerGone), not make a connection nobody will
    ever use."""
    server = peer("hold", "fault.connect", "--hold-accept")
    before = set(os.listdir("/proc/self/fd"))

    async def main() -> None:
        task = asyncio.create_task(aio.connect("fault.connect", config=config, timeout=10))
        await in_thread(server.expect, "REQUEST")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.send("accept")
        assert await in_thread(server.expect, "GONE") == ["PeerGone"]
        # Let the executor finish the handshake the cancelled call started.
        await asyncio.get_running_loop().shutdown_default_executor()

    asyncio.run(main())
    import gc
    gc.collect()
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - before
              if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, leaked  # today: the server's pidfd, opened by the handshake, never closed


def test_cancelled_aio_create_port_leaves_no_registration_behind(broker, config) -> None:  # type: ignore[no-untyped-def]
    """Cancel aio.create_port while the registration runs in the executor: the name must
    not stay registered by a port nobody can reach (nor its broker link stay open)."""

    async def cancelled() -> None:
        task = asyncio.create_task(aio.create_port("fault.create", config=config, timeout=10))
        await asyncio.sleep(0)  # handshake-free: one loop turn: the task runs up to its await of the executor
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # asyncio.run waits for the executor: the registration has finished when it returns.

    async def again() -> None:
        port = await aio.create_port("fault.create", config=config, timeout=10)
        await port.close()

    asyncio.run(cancelled())
    asyncio.run(again())  # today: NameInUse, the cancelled call's port holds the name


# -- listen(timeout=0) leaves its reader on the broker link ---------------------------------


def test_listen_poll_leaves_no_reader_registered_on_the_loop(spawn, runtime_dir: Path, config) -> None:  # type: ignore[no-untyped-def]
    """listen(timeout=0) (a poll) raises Timeout from _within before awaiting the future
    _readable made, so the add_reader on the broker link is never removed. After the port
    closes, the loop's selector keeps a key for a closed fd: the next port's link, which
    gets the same fd number, is then never registered with epoll by add_reader (same
    events: only the callback is replaced), and its listen never sees a client."""
    broker = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker"])
    broker.expect("READY")  # a broker process: no broker threads opening fds in this one

    async def main() -> tuple[list[int], str]:
        loop = asyncio.get_running_loop()
        port = await aio.create_port("fault.poll", config=config, timeout=10)
        link = port._port._link.wait_fds()
        with pytest.raises(alpc.Timeout):
            await port.listen(timeout=0)
        await asyncio.sleep(0)  # handshake-free: one loop turn: done-callbacks of the poll's future run
        left = [fd for fd in link if fd in loop._selector.get_map()]
        await port.close()
        second = await aio.create_port("fault.poll2", config=config, timeout=10)
        try:
            reused = second._port._link.wait_fds()
            client = loop.run_in_executor(None, lambda: alpc.connect("fault.poll2", config=config, timeout=10))
            try:
                request = await second.listen(timeout=5)
                comm = await request.accept()
                outcome = "second port saw its client"
            except alpc.Timeout:
                outcome = f"second port (link fd {reused}) never saw its client"
                comm = None
            try:
                (await client).close()
            except alpc.Timeout:
                outcome += "; the client timed out waiting for the port to answer"
            if comm is not None:
                await comm.close()
        finally:
            await second.close()
        return left, outcome

    try:
        left, outcome = asyncio.run(main())
    finally:
        broker.proc.send_signal(signal.SIGTERM)
        broker.proc.wait(10)
    assert not left and outcome == "second port saw its client", (left, outcome)


# -- completion port: a reply the port refuses ---------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_completion_port_answers_when_the_reply_is_refused(broker, config, kind) -> None:  # type: ignore[no-untyped-def]
    """A handler whose result the port cannot send (here: longer than the client takes).
    The sync pool logs it and answers with an empty reply (CompletionPort._run); the
    async pool calls _answer outside its try, so the task dies with the exception and
    the client waits for a reply that never comes."""
    import threading
    limit = 64 * 1024

    def make() -> bytes:
        return b"x" * (limit * 4)

    if kind == "sync":
        def handle(message: alpc.Message) -> bytes:
            return make()
    else:
        async def handle(message: alpc.Message) -> bytes:  # type: ignore[misc]
            return make()

    import dataclasses
    client_config = dataclasses.replace(config, max_message_length=limit)
    with alpc.create_port("fault.toolarge." + kind, config=config) as port:
        completion = alpc.CompletionPort(port, handle, max_workers=2)
        serving = threading.Thread(target=completion.serve, kwargs={"timeout": 30})
        serving.start()
        try:
            with alpc.connect("fault.toolarge." + kind, config=client_config, timeout=10) as comm:
                try:
                    outcome: object = comm.request(b"go", timeout=5).data
                except alpc.Timeout as exc:
                    outcome = exc
        finally:
            completion.stop()
            serving.join(10)
    assert outcome == b"", outcome


# -- a request cancelled while its bytes wait in the write queue ------------------------------


def test_request_cancelled_while_queued_is_cancelled_at_the_server(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """README: cancelling a task that awaits request cancels the request at the server.
    When the cancel lands while the request's bytes wait in the write queue (the peer's
    socket is full), aio._send_request only abandons the id: the bytes go out, no CANCEL
    follows, and the server runs the handler to the end for a caller that is gone."""
    server = peer("hold", "fault.reqcancel")

    async def main() -> None:
        comm = await aio.connect("fault.reqcancel", config=config, timeout=10)
        try:
            await in_thread(server.expect, "ACCEPTED")
            comm._stream._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            for _ in range(100):
                await comm.send(b"s" * 200, flush=False)  # 20 KB owed: rides with the request
            task = asyncio.create_task(comm.request(b"slow", timeout=10))
            await until(lambda: bool(comm._unsent), "the request's write to be queued")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            server.send("read")
            assert (await comm.request(b"ping", timeout=15)).data == b"PING"
            first = await in_thread(server.expect, "REQ")
            if first[0] == "s":  # handed out before the CANCEL was read: the handler must see it
                verdict = await in_thread(server.expect, "")
                assert verdict == ["SAW_CANCEL"], verdict
            else:  # dropped by the server's runtime before dispatch, as README promises
                assert first[0] == "p", first
        finally:
            await comm.close()

    asyncio.run(main())

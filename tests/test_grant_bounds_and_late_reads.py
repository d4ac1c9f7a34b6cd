"""Direct client memory (memory grants), from a review: a read outside the grant is a
SectionError before anything is allocated, readinto() a read-only buffer is a SectionError on
both paths, a fallback read's late answer does not break the next read, and an asyncio server
that uses a grant hears an alpc error. Each test failed before.
"""

from __future__ import annotations

import asyncio
import select
import threading

import pytest
from local_pairs import local_connection  # tests/ is on sys.path

import alpc
from alpc import aio

# -- 1. PeerMemory.read allocates before it checks: a range outside the grant is not a SectionError --


@pytest.mark.timeout(30)
@pytest.mark.parametrize("offset, length", [(101, None), (0, 1 << 62), (0, 1 << 63), (0, -1)],
                         ids=["offset-past-end", "huge-length", "length-past-ssize", "negative-length"])
def test_read_outside_the_grant_is_a_section_error(broker, config, offset, length) -> None:  # type: ignore[no-untyped-def]
    """README: "A range outside the grant (a negative offset included) is a SectionError".
    PeerMemory.read sizes its bytearray from the caller's (offset, length) before checking the
    range: ValueError (negative count), MemoryError or OverflowError instead."""
    with local_connection(config, "svc.review.read-range") as (_, server, client):
        pending = client.start_request(b"x", grant=alpc.MemoryGrant(bytearray(100)), timeout=5)
        request = server.receive(timeout=5)
        try:
            with pytest.raises(alpc.SectionError):
                request.grant.read(offset, length, timeout=5)
        finally:
            request.reply(b"ok", timeout=5)
            assert pending.result(timeout=5).data == b"ok"


# -- 2. readinto a read-only buffer: the C path and the pure-Python twin disagree ------------------


@pytest.mark.timeout(30)
def test_readinto_a_read_only_buffer_is_a_section_error(broker, config) -> None:  # type: ignore[no-untyped-def]
    """The pure-Python twin answers SectionError ("a writable grant needs a writable buffer");
    with the C extension ffi.from_buffer(require_writable=True) escapes as a bare TypeError."""
    with local_connection(config, "svc.review.readinto") as (_, server, client):
        pending = client.start_request(b"x", grant=alpc.MemoryGrant(bytearray(b"a" * 100)), timeout=5)
        request = server.receive(timeout=5)
        try:
            with pytest.raises(alpc.SectionError):
                request.grant.readinto(bytes(16), 0, timeout=5)
        finally:
            request.reply(b"ok", timeout=5)
            assert pending.result(timeout=5).data == b"ok"


# -- 3. a fallback read given up on, then another: the late answer kills the connection ------------


@pytest.mark.timeout(30)
def test_a_late_fallback_answer_does_not_break_the_next_read(broker, config) -> None:  # type: ignore[no-untyped-def]
    """protocol._grant_data_received pops the *current* asked range before it looks at
    _late_grant_reads: the client's late answer to a read the server timed out on is matched
    against the server's next read of another range, which is a ProtocolError, and the server
    drops the connection (PeerGone) although both sides behaved."""
    attributes = alpc.PortAttributes(direct_memory=False)
    with local_connection(config, "svc.review.lateread", attributes) as (_, server, client):
        source = bytes(range(64))
        pending = client.start_request(b"x", grant=alpc.MemoryGrant(source), timeout=5)
        request = server.receive(timeout=5)
        # The client answers nothing until result() is called: the first read times out.
        with pytest.raises(alpc.Timeout):
            request.grant.read(0, 16, timeout=0.2)
        outcome: list[object] = []

        def wait_reply() -> None:
            try:
                outcome.append(pending.result(timeout=10).data)
            except Exception as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait_reply)
        waiter.start()
        # Handshake: the client's answer to the first read has reached the server's socket.
        readable, _, _ = select.select([server.fileno()], [], [], 10)
        assert readable, "the client never answered the first read"
        try:
            got = request.grant.read(16, 16, timeout=5)
            assert got == source[16:32]
            request.reply(b"ok", timeout=5)
        finally:
            waiter.join(15)
        assert outcome == [b"ok"]


# -- 4. closing the port unpins a grant the server may still write into directly -------------------


@pytest.mark.timeout(30)
def test_an_asyncio_server_using_a_grant_gets_an_alpc_error(broker, config) -> None:  # type: ignore[no-untyped-def]
    """"Memory grants are served by the blocking API only": an asyncio server still receives
    message.grant (a PeerMemory), and using it raises AttributeError
    ('AsyncCommunicationPort' object has no attribute '_grant_read') rather than an alpc error."""

    async def main() -> None:
        port = await aio.create_port("svc.review.aio", config=config, timeout=10)
        try:
            done = asyncio.get_running_loop().create_future()
            loop = asyncio.get_running_loop()

            def client() -> None:
                try:
                    with alpc.connect("svc.review.aio", config=config, timeout=10) as comm:
                        result = comm.request(b"x", grant=alpc.MemoryGrant(bytearray(64)), timeout=10).data
                except Exception as exc:
                    result = exc
                loop.call_soon_threadsafe(done.set_result, result)

            thread = threading.Thread(target=client)
            thread.start()
            request = await port.listen(timeout=10)
            comm = await request.accept()
            try:
                message = await comm.receive(timeout=10)
                assert message.grant is not None
                try:
                    message.grant.read(0, 16, timeout=1)
                except alpc.AlpcError:
                    pass  # refused with an alpc error: fine
                finally:
                    await message.reply(b"ok")
                assert await asyncio.wait_for(done, 10) == b"ok"
            finally:
                await comm.close()
                await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        finally:
            await port.close()

    asyncio.run(main())

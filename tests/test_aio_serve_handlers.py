"""alpc/aio.py's serve(): its handler tasks end with the connection, and section ranges come back.

Everything here runs on one event loop (client and server ports in this process): the
questions are about the asyncio driver's bookkeeping, not about a process boundary, and one
loop makes every ordering explicit (no sleeps; each wait is bounded by a timeout).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import alpc
from alpc import aio
from alpc.wire import MessageType

pytestmark = pytest.mark.timeout(60)

SECTION = 128 * 1024
BIG = 80 * 1024  # two never fit in one SECTION-byte budget; past EAGER_COPY_MAX, so a body waits to be read


def small_sections(config: alpc.Config) -> alpc.Config:
    return dataclasses.replace(config, section_size=SECTION, max_section_bytes=SECTION)


async def pair(name: str, config: alpc.Config, client_config: alpc.Config | None = None,
               attributes: alpc.PortAttributes | None = None,
               ) -> tuple[aio.AsyncConnectionPort, aio.AsyncCommunicationPort, aio.AsyncCommunicationPort]:
    port = await aio.create_port(name, attributes, config=config, timeout=10)
    connecting = asyncio.create_task(aio.connect(name, config=client_config or config, timeout=10))
    request = await port.listen(timeout=10)
    server_comm = await request.accept()
    client = await connecting
    return port, server_comm, client


async def run_pair(name: str, config: alpc.Config, body: Callable[..., Awaitable[Any]], *,
                   client_config: alpc.Config | None = None,
                   attributes: alpc.PortAttributes | None = None) -> Any:
    port, server_comm, client = await pair(name, config, client_config, attributes)
    try:
        return await body(server_comm, client)
    finally:
        await client.close()
        await server_comm.close()
        await port.close()


# -- 1. datagram handler tasks and close() ----------------------------------------------------


@pytest.mark.parametrize("kind", ["request", "datagram"])
def test_close_cancels_serve_handlers_of_every_kind(broker, config, kind: str) -> None:  # type: ignore[no-untyped-def]
    """close() cancels the handler tasks serve() started: a request's handler is cancelled
    (it is in ``_tasks``); a datagram's handler, never put in ``_tasks``, kept running after
    close."""

    async def body(server_comm: aio.AsyncCommunicationPort, client: aio.AsyncCommunicationPort) -> str:
        started = asyncio.Event()
        cancelled = asyncio.Event()
        never = asyncio.get_running_loop().create_future()

        async def handler(message: alpc.Message) -> bytes | None:
            started.set()
            try:
                await never
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return None

        serving = asyncio.create_task(server_comm.serve(handler))
        pending = None
        if kind == "request":
            pending = asyncio.create_task(client.request(b"hold", timeout=30))
        else:
            await client.send(b"hold", timeout=10)
        await asyncio.wait_for(started.wait(), 10)
        await server_comm.close()
        try:
            await asyncio.wait_for(cancelled.wait(), 5)
            outcome = "cancelled"
        except TimeoutError:
            outcome = "still running after close"
        never.cancel()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        return outcome

    assert asyncio.run(run_pair(f"left.close.{kind}", config, body)) == "cancelled"


# -- 2. a view dropped by a serve() handler: is its release ever sent? ---------------------


@pytest.mark.parametrize("as_view", [False, True], ids=["body", "view"])
def test_serve_sends_the_release_of_a_dropped_body_without_being_asked_again(  # type: ignore[no-untyped-def]
        broker, config, monkeypatch, as_view: bool) -> None:
    """A sender out of section space asks once (RELEASE_WANTED) while the serve() handler
    still holds the body; the handler then ends and drops it (unread or unreleased). The
    blocking driver sends such queued releases before it sleeps (``_read``); serve() never
    did, so the sender waited for its next re-ask (SPACE_REASK: 2 ms doubling to 100 ms).
    Re-asking is pushed out of reach here, so only a release the server sends by itself
    lets the second send through."""

    async def body(server_comm: aio.AsyncCommunicationPort, client: aio.AsyncCommunicationPort) -> str:
        held = asyncio.Event()
        go = asyncio.Event()
        seen: list[int] = []

        async def handler(message: alpc.Message) -> None:
            seen.append(message.size)
            if len(seen) == 1:
                held.set()
                await go.wait()
            # dropped here, neither read nor released

        serving = asyncio.create_task(server_comm.serve(handler))
        try:
            if as_view:
                first = await client.create_view(BIG, timeout=10)
                first.memory[:] = b"a" * BIG
                await client.send(first, timeout=10)
            else:
                await client.send(b"a" * BIG, timeout=10)
            await asyncio.wait_for(held.wait(), 10)
            monkeypatch.setattr(aio, "SPACE_REASK", (30.0, 30.0))  # one RELEASE_WANTED only
            second = asyncio.create_task(client.send(b"b" * BIG, timeout=5))
            await asyncio.sleep(0)  # handshake-free: one loop turn: its reserve fails and RELEASE_WANTED is written
            assert client._space_waiters, "the second send should be waiting for space"
            # The pong follows the RELEASE_WANTED: the server has read it (and had nothing to give).
            await client.ping(timeout=5)
            go.set()
            try:
                await second
                return "sent"
            except alpc.Throttled:
                return "stalled: the release was never sent"
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

    small = small_sections(config)
    assert asyncio.run(run_pair(f"left.release.{as_view}", config, body, client_config=small)) == "sent"


# -- 3. a view the handler returns but nobody sends -------------------------------------------


@pytest.mark.parametrize("kind", ["datagram", "cancelled"])
def test_a_view_returned_and_not_sent_gives_its_space_back(broker, config, kind: str) -> None:  # type: ignore[no-untyped-def]
    """A handler returns a SectionView (its reply) for a datagram, or for a request its client
    cancelled: _handle sends nothing. The server's section must get that space back at once
    (not only when the connection closes): a view of the whole budget fits again."""

    async def body(server_comm: aio.AsyncCommunicationPort, client: aio.AsyncCommunicationPort) -> str:
        returned = asyncio.Event()
        entered = asyncio.Event()

        async def handler(message: alpc.Message) -> Any:
            view = await server_comm.create_view(BIG, timeout=10)
            view.memory[:4] = b"view"
            if message.type is MessageType.DATAGRAM:
                returned.set()
                return view
            entered.set()
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                returned.set()
                return view  # the handler answers anyway; the request is cancelled
            return view

        serving = asyncio.create_task(server_comm.serve(handler))
        try:
            if kind == "datagram":
                await client.send(b"go", timeout=10)
            else:
                calling = asyncio.create_task(client.request(b"go", timeout=30))
                await asyncio.wait_for(entered.wait(), 10)
                calling.cancel()
                await asyncio.gather(calling, return_exceptions=True)
            await asyncio.wait_for(returned.wait(), 10)
            # Woken after the handler's task finished its step: _handle has returned.
            try:
                again = await server_comm.create_view(BIG, timeout=1)
            except alpc.Throttled:
                return "held"
            again.release()
            return "given back"
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

    attributes = alpc.PortAttributes(section_size=SECTION, max_section_bytes=SECTION)
    assert asyncio.run(run_pair(f"left.view.{kind}", config, body, attributes=attributes)) == "given back"

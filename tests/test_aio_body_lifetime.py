"""alpc/aio.py: a received body kept beyond its handler (or its loop turn) and dropped later.

A body whose view is dropped unreleased (its finalizer runs) only queues its range. The
asyncio driver sent such queued releases when a serve() handler task ended, or before
receive() sleeps, but not when the body outlives both: the sender, out of section space and
having asked once (RELEASE_WANTED, answered with nothing while the body was held), heard
only on its next re-ask. Re-asking is pushed out of reach here (SPACE_REASK), so only a
release the receiver sends by itself lets the second send through.

Client and server ports live on one event loop in this process, as in
tests/test_aio_serve_handlers.py: every ordering is explicit, and each wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
from local_pairs import aio_connection

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)

SECTION = 128 * 1024
BIG = 80 * 1024  # two never fit in one SECTION-byte budget; past EAGER_COPY_MAX, so a body waits to be read


def _small(config: alpc.Config) -> alpc.Config:
    """A client whose receive quota holds one SECTION-byte section."""
    return dataclasses.replace(config, section_size=SECTION, max_section_bytes=SECTION)


@pytest.mark.parametrize("how", ["serve", "iterate"])
def test_a_body_kept_past_its_handler_is_released_when_dropped(broker, config, monkeypatch,  # type: ignore[no-untyped-def]
                                                                how: str) -> None:
    """The handler (or the ``async for`` body) keeps the message in a list and returns; the
    second send, out of space, asks once while it is kept; then the application drops it."""

    async def main() -> str:
        port, server_comm, client = await aio_connection(f"zz.keep.{how}", config, _small(config))
        kept: list[alpc.Message] = []
        got = asyncio.Event()

        async def handler(message: alpc.Message) -> None:
            kept.append(message)  # kept beyond this task, neither read nor released
            got.set()

        async def iterate() -> None:
            async for message in server_comm:
                kept.append(message)
                got.set()
                del message  # only the list holds it while the loop waits for the next one

        serving = asyncio.create_task(server_comm.serve(handler) if how == "serve" else iterate())
        try:
            await client.send(b"a" * BIG, timeout=10)
            await asyncio.wait_for(got.wait(), 10)
            monkeypatch.setattr(aio, "SPACE_REASK", (30.0, 30.0))  # one RELEASE_WANTED only
            second = asyncio.create_task(client.send(b"b" * BIG, timeout=5))
            await asyncio.sleep(0)  # handshake-free: one loop turn; its reserve fails, RELEASE_WANTED goes
            assert client._space_waiters, "the second send should be waiting for space"
            # The pong follows the RELEASE_WANTED: the server has read it (and had nothing to give).
            await client.ping(timeout=5)
            kept.clear()  # dropped: the view's finalizer gives the range back
            try:
                await second
                return "sent"
            except alpc.Throttled:
                return "stalled: the release was never sent"
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            await client.close()
            await server_comm.close()
            await port.close()

    assert asyncio.run(main()) == "sent"


# -- iterating a port held the last message until the next one came -------------------------


def test_async_for_does_not_keep_the_last_message(broker, config) -> None:  # type: ignore[no-untyped-def]
    """``async for message in comm`` kept the message it yielded last (its generator's frame)
    while awaiting the next one: a body the application had dropped never went back to the
    sender, who, out of space, could send nothing more; it re-asked until Throttled."""

    async def main() -> str:
        port, server_comm, client = await aio_connection("zz.iter.async", config, _small(config))
        kept: list[alpc.Message] = []
        got = asyncio.Event()

        async def iterate() -> None:
            async for message in server_comm:
                kept.append(message)
                got.set()
                del message

        reading = asyncio.create_task(iterate())
        try:
            await client.send(b"a" * BIG, timeout=10)
            await asyncio.wait_for(got.wait(), 10)
            kept.clear()  # the application is done with it
            try:
                await client.send(b"b" * BIG, timeout=3)
                return "sent"
            except alpc.Throttled:
                return "stalled: the iterator still holds the body"
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await client.close()
            await server_comm.close()
            await port.close()

    assert asyncio.run(main()) == "sent"


def test_for_does_not_keep_the_last_message(broker, config) -> None:  # type: ignore[no-untyped-def]
    """The blocking twin: ``for message in comm`` in a reader thread."""
    small = _small(config)
    with alpc.create_port("zz.iter.blocking", config=config, timeout=10) as port:
        connected: list[alpc.CommunicationPort] = []
        connecting = threading.Thread(target=lambda: connected.append(
            alpc.connect("zz.iter.blocking", config=small, timeout=10)))
        connecting.start()
        server_comm = port.listen(timeout=10).accept()
        connecting.join(10)
        client = connected[0]
        kept: list[alpc.Message] = []
        got = threading.Event()

        def iterate() -> None:
            for message in server_comm:
                kept.append(message)
                got.set()
                del message

        reader = threading.Thread(target=iterate)
        reader.start()
        try:
            client.send(b"a" * BIG, timeout=10)
            assert got.wait(10)
            kept.clear()
            try:
                client.send(b"b" * BIG, timeout=3)
                outcome = "sent"
            except alpc.Throttled:
                outcome = "stalled: the iterator still holds the body"
        finally:
            client.close()  # the reader gets PORT_CLOSED and its loop ends
            reader.join(10)
            kept.clear()
            server_comm.close()
    assert outcome == "sent"

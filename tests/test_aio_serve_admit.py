"""``AsyncCommunicationPort.serve(admit=)``: a message admit() refuses waits, and everything
after it, unread in the inbox until a running handler ends; then it is asked again, in order.
(rpc.aio.Server holds a client's one-way backlog this way.)"""

from __future__ import annotations

import asyncio

import pytest
from async_steps import until

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)


def test_a_refused_message_waits_for_a_running_handler_to_end(broker: alpc.Broker, config: alpc.Config) -> None:
    async def main() -> None:
        release = asyncio.Event()
        handled: list[bytes] = []
        in_flight = 0

        def admit(message: alpc.Message) -> bool:
            nonlocal in_flight
            if message.type is alpc.MessageType.REQUEST:
                return True
            if in_flight:
                return False  # one datagram at a time
            in_flight += 1
            return True

        async def handler(message: alpc.Message) -> bytes | None:
            nonlocal in_flight
            handled.append(message.data)
            if message.type is alpc.MessageType.REQUEST:
                return b"answered"
            try:
                if message.data == b"first":
                    await asyncio.wait_for(release.wait(), 30)
            finally:
                in_flight -= 1
            return None

        async with await aio.create_port("svc.aio.admit", config=config) as port:
            connecting = asyncio.ensure_future(aio.connect("svc.aio.admit", config=config, timeout=10))
            server = await (await port.listen(10)).accept()
            async with await connecting as client, server:
                serving = asyncio.ensure_future(server.serve(handler, admit=admit))
                await client.send(b"first", 10)
                await client.send(b"second", 10)
                answer = asyncio.ensure_future(client.request(b"question", 10))
                inbox = server._core.inbox
                await until(lambda: handled == [b"first"] and len(inbox) == 2,
                            "the first datagram handled, the second and the request held back")
                release.set()  # the first handler ends: the second is admitted, then the request
                assert (await asyncio.wait_for(answer, 10)).data == b"answered"
                assert handled == [b"first", b"second", b"question"]
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)

    asyncio.run(main())


def test_admit_must_be_callable(broker: alpc.Broker, config: alpc.Config) -> None:
    async def main() -> None:
        async with await aio.create_port("svc.aio.admit.type", config=config) as port:
            connecting = asyncio.ensure_future(aio.connect("svc.aio.admit.type", config=config, timeout=10))
            server = await (await port.listen(10)).accept()
            async with await connecting, server:
                with pytest.raises(TypeError, match="admit must be callable"):
                    await server.serve(lambda message: None, admit=True)  # type: ignore[arg-type]

    asyncio.run(main())


def test_an_admit_that_raises_ends_serve_and_loses_no_message(broker: alpc.Broker, config: alpc.Config) -> None:
    async def main() -> None:
        def admit(message: alpc.Message) -> bool:
            raise LookupError("no verdict")

        async with await aio.create_port("svc.aio.admit.raises", config=config) as port:
            connecting = asyncio.ensure_future(aio.connect("svc.aio.admit.raises", config=config, timeout=10))
            server = await (await port.listen(10)).accept()
            async with await connecting as client, server:
                await client.send(b"kept", 10)
                with pytest.raises(LookupError, match="no verdict"):
                    await asyncio.wait_for(server.serve(lambda message: None, admit=admit), 10)
                assert (await server.receive(10)).data == b"kept"

    asyncio.run(main())

"""``secure=True`` is never dropped silently when the body is a view.

README ("Secure views"): ``send(data, secure=True)`` makes the message secure, so what the
receiver reads can never change. A view made by ``create_view(n)`` (not secure) lives in a pooled
section the sender keeps writable; sending it with ``secure=True`` used to go out plain, the
receiver's view not secure, with no error. It is a ``SectionError`` now, the view still the
caller's (it may release it, or send it without ``secure``).
"""

from __future__ import annotations

import asyncio

import pytest

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)

SIZE = 64 << 10


def _filled_view(comm: alpc.CommunicationPort) -> alpc.SectionView:
    view = comm.create_view(SIZE, timeout=5)
    view.memory[:] = b"v" * SIZE
    return view


def _arrived_secure(comm: alpc.CommunicationPort) -> bool:
    message = comm.receive(timeout=5)
    assert message.view is not None
    secure = message.view.secure
    message.view.release()
    return secure


def test_sending_a_plain_view_with_secure_is_refused_and_the_view_stays_the_callers(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort]) -> None:
    server, client = local_pair
    view = _filled_view(server)
    try:
        server.send(view, timeout=5, secure=True)
    except alpc.SectionError:
        pass
    else:
        assert _arrived_secure(client), "secure=True was dropped: the receiver's view is not secure"
    assert not view.sent and not view.released  # refused before anything was taken
    server.send(view, timeout=5)  # the caller can still send it plain
    assert not _arrived_secure(client)
    secure_view = server.create_view(SIZE, secure=True, timeout=5)
    secure_view.memory[:] = b"s" * SIZE
    server.send(secure_view, timeout=5, secure=True)
    assert _arrived_secure(client)


def test_replying_with_a_plain_view_and_secure_is_refused_and_the_request_still_owed(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort]) -> None:
    server, client = local_pair
    pending = client.start_request(b"ask", timeout=10)
    request = server.receive(timeout=5)
    view = _filled_view(server)
    try:
        request.reply(view, secure=True)
    except alpc.SectionError:
        request.reply(b"answered plainly")
        assert pending.result(timeout=5).data == b"answered plainly"
        view.release()
    else:
        reply = pending.result(timeout=5)
        assert reply.view is not None
        secure = reply.view.secure
        reply.view.release()
        assert secure, "secure=True was dropped: the receiver's view is not secure"


def test_the_asyncio_driver_refuses_it_too(broker: alpc.Broker, config: alpc.Config) -> None:
    async def main() -> None:
        port = await aio.create_port("svc.views.secure.aio", config=config)
        connecting = asyncio.ensure_future(aio.connect("svc.views.secure.aio", config=config, timeout=10))
        request = await port.listen(timeout=10)
        server = await request.accept()
        client = await connecting
        try:
            view = await server.create_view(SIZE, timeout=5)
            view.memory[:] = b"a" * SIZE
            try:
                await server.send(view, timeout=5, secure=True)
            except alpc.SectionError:
                view.release()
            else:
                message = await client.receive(timeout=5)
                assert message.view is not None
                secure = message.view.secure
                message.view.release()
                assert secure, "secure=True was dropped: the receiver's view is not secure"
        finally:
            await client.close()
            await server.close()
            await port.close()

    asyncio.run(main())

"""Servers whose accept of one client fails: that client gets a prompt, typed answer, and the
server serves the next one (as alpc.CompletionPort does, tests/test_completion_faults.py).

An accept can fail before it takes the request's socket (accept data over the runtime's
``max_connect_data``: an AlpcError) or after (out of fds: an OSError, the socket closed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from rpc_peers import StoreImpl

import alpc
from alpc import aio, rpc
from alpc.rpc.hello import encode_hello
from alpc.server import ConnectionRequest

pytestmark = pytest.mark.timeout(60)

NAME = "svc.store"
HELLO = encode_hello("test.store", (2, 3))
# Far below the connect timeout a stuck client would wait out.
PROMPT = 3.0


def _fail_before_taking(request: ConnectionRequest) -> None:
    raise alpc.MessageTooLarge("injected: accept data over max_connect_data")


def _fail_after_taking(request: ConnectionRequest) -> None:
    request._take_stream().close()  # as accept_channel's own cleanup does
    request._close_pidfd()
    raise OSError(errno.EMFILE, "injected: Too many open files")


FAILURES = {"before-taking": _fail_before_taking, "emfile": _fail_after_taking}


@pytest.fixture(params=["before-taking"])
def fail_once(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The next accept_channel fails (one of FAILURES); the list records that it did.

    (The RPC servers already go on after an accept that closed its socket: only the
    failure that leaves the request unanswered is theirs to fix.)
    """
    real = ConnectionRequest.accept_channel
    failing = FAILURES[request.param]
    failed: list[int] = []

    def accept_channel(self: ConnectionRequest, *args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(self.client.pid)
            failing(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ConnectionRequest, "accept_channel", accept_channel)
    yield failed


def _refused_promptly(connect: Callable[[], object]) -> None:
    started = time.monotonic()
    with pytest.raises((alpc.ConnectionRejected, alpc.ConnectionClosed)) as refused:  # PeerGone: socket closed
        connect()
    if isinstance(refused.value, alpc.ConnectionRejected):
        assert "could not accept" in refused.value.reason
    assert time.monotonic() - started < PROMPT


def test_blocking_rpc_server_answers_a_client_it_cannot_accept(broker: alpc.Broker, config: alpc.Config,
                                                               fail_once: list[int]) -> None:
    with rpc.Server(NAME, StoreImpl(), config=config, workers=2):
        _refused_promptly(lambda: alpc.connect(NAME, HELLO, config=config, timeout=10))
        assert fail_once
        with alpc.connect(NAME, HELLO, config=config, timeout=10) as comm:
            assert comm.request(b"", timeout=10) is not None  # served (an error reply for an empty call)


def test_blocking_rpc_server_with_small_max_connect_data_refuses_instead_of_hanging(
        broker: alpc.Broker, config: alpc.Config) -> None:
    """No injection: its own hello is over the runtime's max_connect_data, so every accept raises
    MessageTooLarge before it answers; the client must not wait out its connect timeout."""
    small = dataclasses.replace(config, max_connect_data=8)
    with rpc.Server(NAME, StoreImpl(), config=small):
        _refused_promptly(lambda: alpc.connect(NAME, HELLO, config=config, timeout=10))


def test_async_rpc_server_answers_a_client_it_cannot_accept(broker: alpc.Broker, config: alpc.Config,
                                                            fail_once: list[int]) -> None:
    async def main() -> None:
        async with rpc.aio.Server(NAME, StoreImpl(), config=config):
            await asyncio.to_thread(_refused_promptly, lambda: alpc.connect(NAME, HELLO, config=config, timeout=10))
            assert fail_once
            comm = await aio.connect(NAME, HELLO, config=config, timeout=10)
            try:
                assert await comm.request(b"", timeout=10) is not None
            finally:
                await comm.close()

    asyncio.run(main())


@pytest.mark.parametrize("fail_once", sorted(FAILURES), indirect=True)
def test_aio_port_serve_goes_on_after_an_accept_that_fails(broker: alpc.Broker, config: alpc.Config,
                                                           fail_once: list[int]) -> None:
    """AsyncConnectionPort.serve() skips a client gone before its accept (ConnectionClosed); any
    other failure of one accept (out of fds) must not end serve() for every client either."""
    async def main() -> bytes:
        port = await aio.create_port("svc.serve", config=config, timeout=10)
        serving = asyncio.create_task(port.serve(lambda message: bytes(message.data).upper()))
        try:
            await asyncio.to_thread(_refused_promptly, lambda: alpc.connect("svc.serve", config=config, timeout=10))
            assert fail_once
            comm = await aio.connect("svc.serve", config=config, timeout=5)
            try:
                return (await comm.request(b"next", timeout=10)).data
            finally:
                await comm.close()
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            await port.close()

    assert asyncio.run(main()) == b"NEXT"

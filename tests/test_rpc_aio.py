"""RPC on asyncio end to end: async proxies and rpc.aio.Server, in real processes (tests/rpc_peers.py).

The client side runs in this process on a fresh event loop per test; servers
are peer processes, the blocking ``server`` role or the asyncio ``async-server``
one, so every pairing of sync and async client and server is exercised.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from rpc_peers import Store, StoreV3
from test_flow import LOOPS, run_on  # its import also opens uvloop's process-wide pipes before any leak check

import alpc
from alpc import rpc
from alpc.errors import AccessDenied, BadArguments, MarshalError, RemoteError, UnknownMethod, VersionMismatch
from alpc.rpc.codec import Codec, Kind
from alpc.rpc.hello import encode_hello

RPC_PEERS = str(Path(__file__).resolve().parent / "rpc_peers.py")
NAME = "svc.async-store"
ROLES = ["server", "async-server"]


def start(spawn: Any, runtime_dir: Path, role: str, *args: str) -> Any:
    peer = spawn.argv([sys.executable, RPC_PEERS, role, NAME, "--runtime-dir", str(runtime_dir), *args])
    peer.expect("READY")
    return peer


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    run_on("asyncio", main)


async def expect(peer: Any, prefix: str) -> list[str]:
    """The peer's next ``prefix`` line, waited for off the loop (the loop keeps serving meanwhile)."""
    words: list[str] = await asyncio.get_running_loop().run_in_executor(None, peer.expect, prefix)
    return words


async def aconnect(config: alpc.Config, interface: type[Any] = Store, **options: Any) -> rpc.aio.AsyncClient[Any]:
    return await rpc.aio.connect(interface, NAME, config=config, timeout=10, **options)


class Visitor(rpc.Interface, name="test.visitor"):
    @rpc.method
    async def visit(self, index: int) -> int:
        await asyncio.sleep(0)  # handshake-free: a yield point, so a callback suspends mid-call
        return index * 2


# -- calls, errors, call kinds ------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_async_proxy_calls_errors_and_one_way(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                              config: alpc.Config, role: str) -> None:
    server = start(spawn, runtime_dir, role)

    async def main() -> None:
        async with await aconnect(config) as client:
            store = client.proxy
            assert client.server.pid == server.pid and client.server_version == (2, 3)
            await store.put("k", {"nested": [1, 2.5, "three", None]})
            assert await store.get("k") == {"nested": [1, 2.5, "three", None]}
            assert await store.echo(1, "two", flag=True) == [[1, "two"], {"flag": True}]
            me = await store.whoami()
            assert (me["pid"], me["uid"], me["method"]) == (os.getpid(), os.getuid(), "whoami")
            with pytest.raises(KeyError) as caught:
                await store.get("absent")
            assert isinstance(caught.value, RemoteError) and caught.value.type_name == "KeyError"
            with pytest.raises(AccessDenied):
                await store.admin()
            with pytest.raises(BadArguments):
                await store.get()
            assert await store.note("one-way") is None
            assert await expect(server, "NOTE") == ["one-way"]
            assert await store.notes() == ["one-way"]
            with pytest.raises(MarshalError, match="one-way"):
                await store.note(rpc.callback(print))
            results = await asyncio.gather(*(store.echo(index) for index in range(20)))
            assert results == [[[index], {}] for index in range(20)]
        assert client.closed

    run(main)


def test_a_sync_client_of_the_async_server(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                           config: alpc.Config) -> None:
    server = start(spawn, runtime_dir, "async-server")
    with rpc.connect(Store, NAME, config=config, timeout=10) as client:
        assert client.proxy.pid() == server.pid
        assert client.with_timeout(5).sleep(0, "quick") <= 5  # the async handler sees the deadline
        with pytest.raises(RuntimeError) as caught:
            client.proxy.fail("runtime")
        assert isinstance(caught.value, RemoteError)
        with rpc.connect(OlderStore, NAME, config=config, timeout=10) as older, pytest.raises(UnknownMethod):
            older.proxy.vanished()
        with pytest.raises(VersionMismatch):
            rpc.connect(StoreV3, NAME, config=config, timeout=10)
        # A sync client's callback, called by an async handler while the client waits.
        fired: list[int] = []
        assert client.proxy.fire(rpc.callback(fired.append), 3) == 3 and fired == [0, 1, 2]


class OlderStore(rpc.Interface, name="test.store", version=(2, 0)):
    @rpc.method
    def vanished(self) -> None: ...


@pytest.mark.parametrize("role", ROLES)
def test_async_deadlines_and_version_checks(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                            config: alpc.Config, role: str) -> None:
    start(spawn, runtime_dir, role)

    async def main() -> None:
        with pytest.raises(VersionMismatch, match=r"3\.0.*2\.3"):
            await aconnect(config, StoreV3)
        async with await aconnect(config, call_timeout=5) as client:
            remaining = (await client.proxy.whoami())["remaining"]
            assert 0 < remaining <= 5
            assert (await client.with_timeout(None).whoami())["remaining"] is None
            with pytest.raises(alpc.Timeout):
                await client.with_timeout(0.3).sleep(5, "late")

    run(main)


@pytest.mark.parametrize("role", ROLES)
def test_async_large_arguments_and_results(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                           config: alpc.Config, role: str) -> None:
    start(spawn, runtime_dir, role)
    big = os.urandom(3 * 1024 * 1024)

    async def main() -> None:
        async with await aconnect(config) as client:
            digest = await client.proxy.digest(big)
            assert digest == ["memoryview", True, len(big), hashlib.sha256(big).hexdigest()]
            blob = await client.proxy.blob(2 * 1024 * 1024, 0x42)
            assert isinstance(blob, memoryview) and blob.readonly and len(blob) == 2 * 1024 * 1024
            assert blob.tobytes().count(b"B") == len(blob)
            await client.proxy.put("big", big)
            assert await client.proxy.get("big") == big
        # Segments in a message small enough for the socket: the parts are gathered, not joined.
        async with await aconnect(config, inline_threshold=16) as client:
            small = b"s" * 100
            assert await client.proxy.digest(small) == ["memoryview", True, 100, hashlib.sha256(small).hexdigest()]

    run(main)


def test_an_async_reply_over_the_clients_limit_is_a_typed_error(broker: alpc.Broker, spawn: Any,
                                                                 runtime_dir: Path, config: alpc.Config) -> None:
    start(spawn, runtime_dir, "async-server")
    small = alpc.Config(runtime_dir=config.runtime_dir, max_message_length=512 * 1024)

    async def main() -> None:
        async with await rpc.aio.connect(Store, NAME, config=small, timeout=10) as client:
            with pytest.raises(alpc.MessageTooLarge, match="remote"):
                await client.proxy.blob(600 * 1024)
            assert await client.proxy.blob(10) == b"a" * 10

    run(main)


# -- cancellation ---------------------------------------------------------------------------------


async def cancel_a_sleep(client: rpc.aio.AsyncClient[Any], server: Any, label: str) -> None:
    """Cancel the task awaiting an async handler's call; the handler must get CancelledError."""
    task = asyncio.create_task(client.proxy.sleep(30, label))
    assert await expect(server, "SLEEPING") == [label]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The handler got CancelledError, and its call context says why.
    assert await expect(server, "CANCELLED") == [label, "True"]


def test_cancelling_the_task_cancels_the_async_handler(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                       config: alpc.Config) -> None:
    server = start(spawn, runtime_dir, "async-server")

    async def main() -> None:
        async with await aconnect(config) as client:
            await cancel_a_sleep(client, server, "job")
            assert await client.proxy.echo("after") == [["after"], {}]

    run(main)


def test_cancelling_the_task_reaches_a_sync_handler(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                    config: alpc.Config) -> None:
    server = start(spawn, runtime_dir, "server", "--workers", "1")

    async def main() -> None:
        async with await aconnect(config) as client:
            task = asyncio.create_task(client.proxy.spin("job"))
            assert await expect(server, "SPINNING") == ["job"]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await expect(server, "CANCELLED") == ["job"]
            assert await client.proxy.pid() == server.pid

    run(main)


def test_a_sync_caller_cancels_an_async_handler(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                config: alpc.Config) -> None:
    server = start(spawn, runtime_dir, "async-server")
    with rpc.connect(Store, NAME, config=config, timeout=10) as client:
        pending = rpc.start_call(client.proxy.sleep, 30, "job")
        assert server.expect("SLEEPING") == ["job"]
        canceller = threading.Thread(target=pending.cancel)
        canceller.start()
        canceller.join(10)
        with pytest.raises(alpc.Cancelled):
            pending.result(timeout=10)
        assert server.expect("CANCELLED") == ["job", "True"]
        with pytest.raises(alpc.Timeout):
            client.with_timeout(0.3).sleep(30, "timed")
        assert server.expect("CANCELLED") == ["timed", "True"]
        assert client.proxy.pid() == server.pid


def test_an_async_timeout_cancels_the_call_at_the_server(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                         config: alpc.Config) -> None:
    server = start(spawn, runtime_dir, "async-server")

    async def main() -> None:
        async with await aconnect(config) as client:
            with pytest.raises(alpc.Timeout):
                await client.with_timeout(0.3).sleep(30, "slow")
            assert await expect(server, "CANCELLED") == ["slow", "True"]
            async with asyncio.timeout(0.3):  # asyncio's own timeout cancels the task: the same path
                with pytest.raises(asyncio.CancelledError):
                    await client.proxy.sleep(30, "outer")
            assert await expect(server, "CANCELLED") == ["outer", "True"]

    run(main)


# -- concurrency and callbacks --------------------------------------------------------------------


def test_async_handlers_run_concurrently(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                         config: alpc.Config) -> None:
    start(spawn, runtime_dir, "async-server")

    async def main() -> None:
        clients = [await aconnect(config) for _ in range(2)]
        try:
            # Returns True only if all three calls wait at the barrier at once: one connection
            # carries two of them, so calls of one client run concurrently too.
            calls = [clients[0].proxy.gather(3, 10), clients[0].proxy.gather(3, 10), clients[1].proxy.gather(3, 10)]
            assert await asyncio.gather(*calls) == [True, True, True]
        finally:
            for client in clients:
                await client.close()

    run(main)


@pytest.mark.parametrize("role", ROLES)
def test_the_server_calls_back_into_an_async_client(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                    config: alpc.Config, role: str) -> None:
    start(spawn, runtime_dir, role)

    async def main() -> None:
        async with await aconnect(config) as client:
            assert await client.proxy.visit(Visitor(), 5) == 2 * (0 + 1 + 2 + 3 + 4)
            fired: list[int] = []
            assert await client.proxy.fire(rpc.callback(fired.append), 3) == 3
            assert fired == [0, 1, 2]

    run(main)


# -- hostile clients -------------------------------------------------------------------------------


def test_the_async_server_refuses_hostile_clients(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                   config: alpc.Config) -> None:
    server = start(spawn, runtime_dir, "async-server")
    with pytest.raises(alpc.ConnectionRejected, match="not an alpc RPC client"):
        alpc.connect(NAME, b"\xc1 not msgpack", config=config, timeout=10)
    codec = Codec()
    with alpc.connect(NAME, encode_hello("test.store", (2, 3)), config=config, timeout=10) as hostile:
        for data, expected in [(b"", "MarshalError"), (b"\x01\x01\x00\x00\xc1", "MarshalError"),
                               (codec.encode_call(0, "nope", (), {}, None)[0], "UnknownMethod")]:
            kind, error = codec.decode_reply(hostile.request(data, timeout=10).data)
            assert kind is Kind.ERROR and error.type_name == expected, (data, error)
        hostile.send(b"\xff garbage datagram")
        reply = hostile.request(codec.encode_call(0, "pid", (), {}, None)[0], timeout=10)
        assert codec.decode_reply(reply.data) == (Kind.RESULT, server.pid)


# -- peers that go away ------------------------------------------------------------------------------


def test_server_death_mid_async_call_raises_peer_gone(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                      config: alpc.Config) -> None:
    server = start(spawn, runtime_dir, "async-server")

    async def main() -> None:
        async with await aconnect(config) as client:
            task = asyncio.create_task(client.proxy.sleep(30, "doomed"))
            assert await expect(server, "SLEEPING") == ["doomed"]
            server.kill()
            with pytest.raises(alpc.PeerGone):
                await task
            with pytest.raises(alpc.ConnectionClosed):
                await client.proxy.pid()

    run(main)


def test_a_client_closing_mid_call_cancels_its_async_handlers(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                              config: alpc.Config) -> None:
    server = start(spawn, runtime_dir, "async-server")

    async def main() -> None:
        client = await aconnect(config)
        task = asyncio.create_task(client.proxy.sleep(30, "orphan"))
        assert await expect(server, "SLEEPING") == ["orphan"]
        await client.close()
        with pytest.raises(alpc.ConnectionClosed):
            await task
        # The server noticed the client go and stopped the handler; it serves others on.
        assert (await expect(server, "CANCELLED"))[0] == "orphan"
        async with await aconnect(config) as other:
            assert await other.proxy.pid() == server.pid

    run(main)


# -- uvloop ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_rpc_on_either_loop(broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config,
                            loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    server = start(spawn, runtime_dir, "async-server", "--loop", loop)

    async def main() -> None:
        async with await aconnect(config) as client:
            big = os.urandom(1024 * 1024)
            assert (await client.proxy.digest(big))[3] == hashlib.sha256(big).hexdigest()
            assert await client.proxy.visit(Visitor(), 3) == 6
            await cancel_a_sleep(client, server, "job")

    run_on(loop, main)

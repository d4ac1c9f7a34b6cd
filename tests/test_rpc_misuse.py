"""The RPC layer against handlers and clients that misuse it: a callback kept past its call, a
handler that calls sys.exit() on a bad argument, a keyword argument that names ``self``.

Servers are real processes (tests/rpc_misuse_peers.py, the blocking and the asyncio one); the
clients run in this process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from rpc_misuse_peers import Hub, HubImpl
from rpc_peer_main import ROLES, start_peer

import alpc
from alpc import rpc
from alpc.errors import BadArguments, RemoteError, UnknownMethod
from alpc.rpc.codec import HEAD, RPC_VERSION, Codec, Kind
from alpc.rpc.dispatch import Dispatcher, ObjectTable
from alpc.rpc.hello import encode_hello
from alpc.security import PeerCred

PEERS = Path(__file__).resolve().parent / "rpc_misuse_peers.py"
NAME = "svc.rpc-misuse"

pytestmark = pytest.mark.timeout(60)


def start(spawn: Any, runtime_dir: Path, role: str) -> Any:
    return start_peer(spawn, PEERS, role, NAME, runtime_dir)


# -- a callback used after the call that passed it ------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_a_callback_kept_past_its_call_fails_at_once_instead_of_hanging(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, role: str) -> None:
    # "The object is exported only for the duration of that call": a handler that keeps the
    # proxy and calls it later (from another client's call) must get UnknownMethod. Before the
    # fix the call went out to the subscriber, a blocking client that reads its connection only
    # while one of its own calls waits, so the publisher hung until its timeout (the server
    # port's 5 s send timeout without one) or until the subscriber happened to call again.
    start(spawn, runtime_dir, role)
    with rpc.connect(Hub, NAME, config=config, timeout=10) as subscriber, \
            rpc.connect(Hub, NAME, config=config, timeout=10, call_timeout=5) as publisher:
        subscriber.proxy.subscribe(rpc.callback(lambda value: value + 1))
        started = time.monotonic()
        with pytest.raises(UnknownMethod, match="only valid during its call"):
            publisher.proxy.publish(1)
        assert time.monotonic() - started < 4
        # The subscriber's connection is fine, and nothing it exported is left.
        assert subscriber.proxy.options(1) == [[1], {}]
        assert len(subscriber._endpoint.objects) == 0


def test_a_remote_object_expires_when_its_call_returns() -> None:
    # In the dispatch core, without I/O: the proxy the handler got is dead once the call is over,
    # also when the peer passed it somewhere a well-behaved peer never would (nested in a list).
    kept: list[Any] = []
    copies: list[Any] = []

    class Keeper(rpc.Interface, name="misuse.keeper"):
        @rpc.method
        def keep(self, *objects: Any) -> int:
            kept.extend(objects)
            if isinstance(objects[0], rpc.RemoteObject):  # a copy shares the original's lease
                copies.append(rpc.with_timeout(objects[0], 1.0))
            return len(objects)

    from alpc.rpc.endpoint import EndpointBase

    me = PeerCred(os.getpid(), os.getuid(), os.getgid())
    endpoint = EndpointBase(ObjectTable(Keeper()), me, limits=Codec().limits, inline_threshold=256,
                            send_tracebacks=False, call_timeout=None)
    ref = msgpack.ExtType(6, msgpack.packb([7, "alpc.callback", {"call": False}]))
    for args in ([ref], [[ref]]):
        data = HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb([0, "keep", args, None, None])
        kind, value = endpoint.codec.decode_reply(bytes(endpoint.dispatcher.handle(data)))  # type: ignore[arg-type]
        assert (kind, value) == (Kind.RESULT, 1)
    assert len(kept) == 2
    with pytest.raises(UnknownMethod, match="only valid during its call"):
        kept[0](1)
    with pytest.raises(UnknownMethod, match="only valid during its call"):
        kept[1][0].call(1)
    with pytest.raises(UnknownMethod, match="only valid during its call"):
        copies[0](1)


@pytest.mark.parametrize("role", ROLES)
def test_objects_passed_to_a_one_way_call_are_refused(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, role: str) -> None:
    # A client refuses to pass objects to a one-way method ("nobody would serve the objects
    # passed to it"); a hostile one sends them anyway and never serves them. Before the fix the
    # handler ran, and its call into the object waited for a reply nobody sends until the port's
    # send timeout (5 s), holding a worker (blocking server; messages arriving meanwhile are
    # served nested on that waiting worker, one level deeper per datagram) or a task (asyncio).
    start(spawn, runtime_dir, role)
    ref = msgpack.ExtType(6, msgpack.packb([1, "alpc.callback", {"call": False}]))
    datagram = HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb([0, "poke", [ref], None, None])
    with alpc.connect(NAME, encode_hello("misuse.hub", (1, 0)), config=config, timeout=10) as hostile, \
            rpc.connect(Hub, NAME, config=config, timeout=10, call_timeout=5) as client:
        for _ in range(3):  # more than the blocking server's two workers
            hostile.send(datagram, timeout=5)
        # Sent after the datagrams on the same connection, so served after them.
        reply = hostile.request(HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb([0, "pokes", [], None, None]),
                                timeout=5)
        assert Codec().result(reply.data) == 0
        assert client.proxy.pokes() == 0


# -- a handler that raises SystemExit --------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_a_handler_calling_sys_exit_fails_its_call_and_not_the_server(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, role: str) -> None:
    # argparse calls sys.exit(2) on an option it does not know. SystemExit is no Exception: on the
    # blocking server it ended the worker thread (no reply: the caller timed out; one such call
    # per worker and the server answered nobody), on the asyncio one it ended the event loop
    # and with it the server process.
    server = start(spawn, runtime_dir, role)
    with rpc.connect(Hub, NAME, config=config, timeout=10, call_timeout=5) as client:
        assert client.proxy.run(["--name", "alpc"]) == "hello alpc"
        for _ in range(3):  # more than the blocking server's two workers
            with pytest.raises(RemoteError) as caught:
                client.proxy.run(["--bogus"])
            assert caught.value.type_name == "SystemExit"
        assert client.proxy.pid() == server.pid
    with rpc.connect(Hub, NAME, config=config, timeout=10, call_timeout=5) as other:
        assert other.proxy.run([]) == "hello world"


# -- keyword arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_a_keyword_naming_self_is_bad_arguments(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, role: str) -> None:
    # options(self, *args, **kwargs): Python refuses options(1, self=2) ("multiple values for
    # argument 'self'"), which the README promises as BadArguments; the signature check dropped
    # `self` and let it through to **kwargs, so the handler's call raised a plain TypeError.
    start(spawn, runtime_dir, role)
    with rpc.connect(Hub, NAME, config=config, timeout=10, call_timeout=5) as client:
        with pytest.raises(BadArguments):
            client.proxy.options(1, self=2)
        assert client.proxy.options(1, other=2) == [[1], {"other": 2}]


def test_the_dispatcher_refuses_a_keyword_naming_self() -> None:
    me = PeerCred(os.getpid(), os.getuid(), os.getgid())
    codec = Codec()
    dispatcher = Dispatcher(codec, ObjectTable(HubImpl()), caller=me)
    data = HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb([0, "options", [1], {"self": 2}, None])
    kind, value = codec.decode_reply(bytes(dispatcher.handle(data)))  # type: ignore[arg-type]
    assert kind is Kind.ERROR and value.code == "bad_arguments", value


# -- an exception that cannot be formatted -----------------------------------------------------


class Noted(Exception):
    @property
    def __notes__(self) -> list[str]:  # type: ignore[override]
        raise RuntimeError("notes are not available")


def test_an_exception_whose_traceback_cannot_be_formatted_still_gets_an_error_reply() -> None:
    # With send_tracebacks=True the reply carries traceback.format_exception(exc), which runs the
    # exception's own code; when that raised, the dispatcher raised instead of replying (the
    # server logged it, the caller waited out its timeout).
    class Raiser(rpc.Interface, name="misuse.raiser"):
        @rpc.method
        def fail(self) -> None:
            raise Noted("the handler failed")

    me = PeerCred(os.getpid(), os.getuid(), os.getgid())
    codec = Codec()
    dispatcher = Dispatcher(codec, ObjectTable(Raiser()), caller=me, send_tracebacks=True)
    data = HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb([0, "fail", [], None, None])
    for path in ("handle", "prepare"):
        raised = None
        try:
            reply = dispatcher.handle(data) if path == "handle" else dispatcher.run(dispatcher.prepare(data))  # type: ignore[arg-type]
        except Exception as exc:  # failed outside the except: pytest cannot print a Noted either
            raised = f"{path}: the dispatcher raised {type(exc).__name__}: {exc}"
        if raised:
            pytest.fail(raised)
        kind, value = codec.decode_reply(bytes(reply))  # type: ignore[arg-type]
        assert kind is Kind.ERROR and value.type_name.endswith("Noted"), value
        assert value.message == "the handler failed" and "could not be formatted" in (value.traceback or "")

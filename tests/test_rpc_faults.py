"""The RPC layer against awkward outcomes: what a handler or a hostile peer can produce that the
layer must still turn into typed errors, and state a failed call must not leave behind.

Servers are real processes (tests/rpc_fault_peers.py, the blocking and the asyncio one);
clients and hostile peers run in this process.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from rpc_fault_peers import Faulty, FaultyImpl
from rpc_peer_main import ROLES, start_peer
from test_flow import run_on

import alpc
from alpc import rpc
from alpc.errors import MarshalError, RemoteError
from alpc.rpc.codec import HEAD, RPC_VERSION, Codec, Kind
from alpc.rpc.dispatch import Dispatcher, ObjectTable
from alpc.rpc.hello import encode_hello
from alpc.security import PeerCred

PEERS = Path(__file__).resolve().parent / "rpc_fault_peers.py"
NAME = "svc.rpc-faults"

pytestmark = pytest.mark.timeout(60)


def start(spawn: Any, runtime_dir: Path, role: str) -> Any:
    return start_peer(spawn, PEERS, role, NAME, runtime_dir)


class Visitor(rpc.Interface, name="fault.visitor"):
    @rpc.method
    def visit(self, value: Any) -> Any:
        return value


def raw_call(envelope: bytes) -> bytes:
    return HEAD.pack(RPC_VERSION, Kind.CALL, 0) + envelope


def me() -> PeerCred:
    return PeerCred(os.getpid(), os.getuid(), os.getgid())


# -- a handler's outcome that msgpack cannot encode as it is ---------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_a_handler_error_whose_message_is_not_utf8_reaches_the_caller(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, role: str) -> None:
    # ValueError("... caf\udce9"): the reply must still be an ERROR naming ValueError. Before the
    # fix the blocking server sent no reply at all (the caller waited out its timeout) and the
    # asyncio one an empty body (MarshalError "needs at least 4 bytes").
    server = start(spawn, runtime_dir, role)
    with rpc.connect(Faulty, NAME, config=config, timeout=10, call_timeout=5) as client:
        with pytest.raises(ValueError) as caught:
            client.proxy.unencodable_error()
        assert isinstance(caught.value, RemoteError) and caught.value.type_name == "ValueError"
        assert "no such entry: caf" in caught.value.remote_message
        assert client.proxy.pid() == server.pid


@pytest.mark.parametrize("role", ROLES)
def test_a_result_that_cannot_be_encoded_for_any_reason_is_a_typed_error(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, role: str) -> None:
    # The result holds an exception whose __str__ raises: a MarshalError reply, not silence.
    server = start(spawn, runtime_dir, role)
    with rpc.connect(Faulty, NAME, config=config, timeout=10, call_timeout=5) as client:
        with pytest.raises(MarshalError, match="cannot marshal the result"):
            client.proxy.unprintable_result()
        assert client.proxy.pid() == server.pid


def test_the_dispatcher_encodes_every_handler_outcome() -> None:
    dispatcher = Dispatcher(Codec(), ObjectTable(FaultyImpl()), caller=me())
    codec = Codec()
    for method in ("unencodable_error", "unprintable_result"):
        reply = dispatcher.handle(raw_call(msgpack.packb([0, method, [], None, None])))
        kind, _ = codec.decode_reply(reply)
        assert kind is Kind.ERROR, method
    # The same through prepare/run (the asyncio driver's path) and with a keyword argument.
    for method in ("unencodable_error", "unprintable_result"):
        prepared = dispatcher.prepare(raw_call(msgpack.packb([0, method, [], {}, 1e300])))
        assert not isinstance(prepared, bytes)
        kind, _ = codec.decode_reply(dispatcher.run(prepared))
        assert kind is Kind.ERROR, method


# -- ext types a peer may send ---------------------------------------------------------------------

# msgpack's own timestamp ext (type -1) as fixext 4, fixext 8 and ext 8 (12 bytes).
TIMESTAMPS = [b"\xd6\xff" + struct.pack(">I", 1234),
              b"\xd7\xff" + struct.pack(">Q", 1234),
              b"\xc7\x0c\xff" + struct.pack(">Iq", 0, 1234)]


@pytest.mark.parametrize("timestamp", TIMESTAMPS)
def test_the_codec_refuses_msgpack_timestamps(timestamp: bytes) -> None:
    # "msgpack ext type codes; any other code is refused": -1 was decoded to msgpack.Timestamp.
    codec = Codec()
    call = raw_call(b"\x95\x00\xa4echo\x91" + timestamp + b"\xc0\xc0")
    with pytest.raises(MarshalError):
        codec.decode_call(call)
    nested = raw_call(b"\x95\x00\xa4echo\x91\x91\x81\xa1k" + timestamp + b"\xc0\xc0")
    with pytest.raises(MarshalError):
        codec.decode_call(nested)
    with pytest.raises(MarshalError):
        codec.result(HEAD.pack(RPC_VERSION, Kind.RESULT, 0) + timestamp)
    # Bytes that merely look like one inside a str or bin are data.
    inline = msgpack.packb([0, "echo", [timestamp, timestamp.decode("latin-1")], None, None])
    assert codec.decode_call(raw_call(inline))[2] == [timestamp, timestamp.decode("latin-1")]


def test_a_hostile_client_cannot_pass_a_timestamp_to_a_handler(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config) -> None:
    server = start(spawn, runtime_dir, "server")
    codec = Codec()
    with alpc.connect(NAME, encode_hello("fault.faulty", (1, 0)), config=config, timeout=10) as hostile:
        reply = hostile.request(raw_call(b"\x95\x00\xa4echo\x91" + TIMESTAMPS[0] + b"\xc0\xc0"), timeout=10)
        kind, value = codec.decode_reply(reply.data)
        assert kind is Kind.ERROR and value.type_name == "MarshalError", value
        good = hostile.request(raw_call(msgpack.packb([0, "pid", [], None, None])), timeout=10)
        assert codec.decode_reply(good.data) == (Kind.RESULT, server.pid)


# -- callbacks of a call that never left --------------------------------------------------------


def test_a_call_that_cannot_be_marshalled_exports_nothing(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config) -> None:
    # The visitor was exported, then a later argument failed to marshal: the call never left,
    # and the visitor stayed exported (and callable by the peer) for the life of the connection.
    server = start(spawn, runtime_dir, "server")
    with rpc.connect(Faulty, NAME, config=config, timeout=10, call_timeout=5) as client:
        objects = client._endpoint.objects
        with pytest.raises(MarshalError):
            client.proxy.visit(Visitor(), {"not", "marshallable"})
        with pytest.raises(MarshalError):
            client.proxy.visit(visitor=Visitor(), value={"not", "marshallable"})
        with pytest.raises(MarshalError):
            rpc.start_call(client.proxy.visit, Visitor(), {"not", "marshallable"})
        with pytest.raises(MarshalError):
            client.proxy.fire(Visitor(), {"not", "marshallable"})
        assert len(objects) == 0
        assert client.proxy.visit(Visitor(), 7) == 7  # a good call still works, and leaves nothing
        assert len(objects) == 0
        assert client.proxy.pid() == server.pid


def test_an_async_call_that_cannot_be_marshalled_exports_nothing(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config) -> None:
    server = start(spawn, runtime_dir, "async-server")

    async def main() -> None:
        async with await rpc.aio.connect(Faulty, NAME, config=config, timeout=10, call_timeout=5) as client:
            objects = client._endpoint.objects
            with pytest.raises(MarshalError):
                await client.proxy.visit(Visitor(), {"not", "marshallable"})
            with pytest.raises(MarshalError):
                await client.proxy.fire(Visitor(), {"not", "marshallable"})
            assert len(objects) == 0
            assert await client.proxy.pid() == server.pid

    run_on("asyncio", main)


# -- one-way callbacks into an asyncio client ------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("role", ROLES)
def test_one_way_callbacks_reach_an_async_client_before_its_reply(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, role: str, loop: str) -> None:
    # Store.fire calls target(i) one-way, then returns: the datagrams precede the reply on the
    # wire, so (as for the blocking client) every one must run while the callback is exported.
    # Before the fix, a reply read in the same batch woke the call first; it released the
    # callback, and the datagrams behind it were refused ("no object 1 on this connection").
    from rpc_peers import Store

    peer = spawn.argv([sys.executable, str(Path(__file__).resolve().parent / "rpc_peers.py"), role, NAME,
                       "--runtime-dir", str(runtime_dir)])
    peer.expect("READY")

    async def main() -> None:
        async with await rpc.aio.connect(Store, NAME, config=config, timeout=10, call_timeout=10) as client:
            for _ in range(20):
                fired: list[int] = []
                assert await client.proxy.fire(rpc.callback(fired.append, oneway=True), 20) == 20
                assert fired == list(range(20))
                assert len(client._endpoint.objects) == 0

    run_on(loop, main)


# -- ext values nested inside ext values -----------------------------------------------------------


def nested_exceptions(depth: int) -> msgpack.ExtType:
    """An EXCEPTION ext whose message field is another EXCEPTION ext, ``depth`` deep (~7 bytes a level)."""
    inner = msgpack.packb(["ValueError", "x"])
    for _ in range(depth):
        inner = msgpack.packb([msgpack.ExtType(5, inner), "x"])
    return msgpack.ExtType(5, inner)


def nested_objects(depth: int) -> msgpack.ExtType:
    inner = msgpack.packb([1, "i", {}])
    for _ in range(depth):
        inner = msgpack.packb([1, msgpack.ExtType(6, inner), {}])
    return msgpack.ExtType(6, inner)


DEPTH = 400  # a 2.8 KiB message; each level used to be a nested msgpack.unpackb on the C stack


@pytest.mark.parametrize("kind", ["exception", "object"])
def test_nested_ext_values_are_refused_not_a_crash(kind: str) -> None:
    # In a child process: before the fix, decoding overflowed the C stack (SIGSEGV).
    script = f"""
import msgpack, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_rpc_faults import nested_exceptions, nested_objects, DEPTH
from alpc.errors import MarshalError
from alpc.rpc.codec import HEAD, RPC_VERSION, Codec, Kind
ext = nested_{kind}s(DEPTH)
codec = Codec(import_object=lambda ref: ref)
call = HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb([0, "echo", [ext], None, None])
result = HEAD.pack(RPC_VERSION, Kind.RESULT, 0) + msgpack.packb(ext)
for decode, data in ((codec.decode_call, call), (codec.result, result)):
    try:
        decode(data)
    except MarshalError:
        print("refused", flush=True)
"""
    import subprocess
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["refused", "refused"]


@pytest.mark.parametrize("role", ROLES)
def test_a_hostile_client_cannot_crash_the_server_with_nested_exts(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, role: str) -> None:
    server = start(spawn, runtime_dir, role)
    codec = Codec()
    with alpc.connect(NAME, encode_hello("fault.faulty", (1, 0)), config=config, timeout=10) as hostile, \
            rpc.connect(Faulty, NAME, config=config, timeout=10, call_timeout=10) as bystander:
        assert bystander.proxy.pid() == server.pid
        # Whether the stack of a blocking server's worker thread overflows before Python's
        # recursion limit stops the decode varies from run to run; ten tries of each make the
        # crash (before the fix) near certain there. The asyncio server's loop thread always crashed.
        for _ in range(10):
            for ext in (nested_exceptions(DEPTH), nested_objects(DEPTH), nested_objects(DEPTH // 2)):
                data = raw_call(msgpack.packb([0, "echo", [ext], None, None]))
                reply = hostile.request(data, timeout=10)
                kind, error = codec.decode_reply(reply.data)
                assert kind is Kind.ERROR and error.type_name == "MarshalError", error
                hostile.send(data)  # a datagram: nothing to answer
        assert bystander.proxy.pid() == server.pid


def test_an_async_server_keeps_admitting_after_an_accept_fails(broker, config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An accept that raises something other than PeerGone (no fds left: EMFILE) ended the
    asyncio server's accept loop for good, while its port stayed registered; the blocking
    server logs it and carries on."""
    import asyncio
    import errno

    from alpc import aio as alpc_aio

    real_accept = alpc_aio.AsyncConnectionRequest.accept
    failed: list[int] = []

    async def accept_failing_once(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not failed:
            failed.append(self.client.pid)
            self.reject("the test's failed admission")  # the client is told at once
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await real_accept(self, *args, **kwargs)

    monkeypatch.setattr(alpc_aio.AsyncConnectionRequest, "accept", accept_failing_once)

    def connect_once() -> bool:
        with rpc.connect(Faulty, "svc.readmit", config=config, timeout=10):
            return True

    async def main() -> bool:
        async with rpc.aio.Server("svc.readmit", FaultyImpl(), config=config):
            loop = asyncio.get_running_loop()
            with pytest.raises(alpc.ConnectionRejected):
                await loop.run_in_executor(None, connect_once)
            return await asyncio.wait_for(loop.run_in_executor(None, connect_once), 20)

    assert asyncio.run(main())
    assert failed


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_async_client_serves_its_callbacks_before_its_first_call(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, loop: str) -> None:
    # rpc.aio.connect returns with the client's serve() already dispatching: the one-way callbacks
    # of the first call may come in the same read as its reply, and are dispatched ahead of it
    # only if serve() is running by then (else the reply woke the call first, which released the
    # callback, and the callbacks were refused: test_one_way_callbacks_... failed ~1 in 20).
    from rpc_peers import Store

    peer = spawn.argv([sys.executable, str(Path(__file__).resolve().parent / "rpc_peers.py"), "server", NAME,
                       "--runtime-dir", str(runtime_dir)])
    peer.expect("READY")

    async def main() -> None:
        async with await rpc.aio.connect(Store, NAME, config=config, timeout=10, call_timeout=10) as client:
            assert client._endpoint.comm._dispatch is not None

    run_on(loop, main)

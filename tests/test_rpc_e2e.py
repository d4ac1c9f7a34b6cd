"""RPC end to end: a real server process (tests/rpc_peers.py), clients in this process."""

from __future__ import annotations

import array
import hashlib
import os
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from rpc_peers import Store, StoreV2Newer, StoreV3

import alpc
from alpc import rpc
from alpc.errors import (
    AccessDenied,
    BadArguments,
    MarshalError,
    RemoteError,
    UnknownMethod,
    VersionMismatch,
)
from alpc.rpc.codec import HEAD, RPC_VERSION, Codec, Ext, Kind
from alpc.rpc.hello import encode_hello

RPC_PEERS = str(Path(__file__).resolve().parent / "rpc_peers.py")
NAME = "svc.store"


def start_server(spawn: Any, runtime_dir: Path, *args: str, name: str = NAME) -> Any:
    peer = spawn.argv([sys.executable, RPC_PEERS, "server", name, "--runtime-dir", str(runtime_dir), *args])
    peer.expect("READY")
    return peer


@pytest.fixture
def server(broker: alpc.Broker, spawn: Any, runtime_dir: Path) -> Any:
    return start_server(spawn, runtime_dir)


def connect(config: alpc.Config, interface: type[Any] = Store, **options: Any) -> rpc.Client[Any]:
    return rpc.connect(interface, NAME, config=config, timeout=10, **options)


# -- calls ---------------------------------------------------------------------------------


def test_calls_results_and_kernel_verified_identity(server: Any, config: alpc.Config) -> None:
    with connect(config) as client:
        store = client.proxy
        assert client.server.pid == server.pid and client.server_version == (2, 3)
        store.put("k", {"nested": [1, 2.5, "three", None]})
        assert store.get("k") == {"nested": [1, 2.5, "three", None]}
        assert store.echo(1, "two", flag=True) == [[1, "two"], {"flag": True}]
        me = store.whoami()
        assert (me["pid"], me["uid"], me["gid"]) == (os.getpid(), os.getuid(), os.getgid())
        assert me["remaining"] is None and me["method"] == "whoami"


def test_remote_errors_are_typed(server: Any, config: alpc.Config) -> None:
    with connect(config) as client:
        with pytest.raises(KeyError) as caught:
            client.proxy.get("absent")
        assert isinstance(caught.value, RemoteError)
        assert caught.value.type_name == "KeyError" and caught.value.remote_traceback is None
        with pytest.raises(RemoteError) as custom:
            client.proxy.fail("custom")
        assert custom.value.type_name.endswith("CustomError") and custom.value.remote_message == "a custom failure"
        with pytest.raises(AccessDenied, match="not you"):
            client.proxy.fail("denied")
        assert client.proxy.pid() == server.pid  # the connection is fine afterwards


def test_tracebacks_when_the_server_sends_them(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                               config: alpc.Config) -> None:
    start_server(spawn, runtime_dir, "--tracebacks")
    with connect(config) as client, pytest.raises(RuntimeError) as caught:
        client.proxy.fail("runtime")
    assert isinstance(caught.value, RemoteError)
    assert "in fail" in (caught.value.remote_traceback or "")


class OlderStore(rpc.Interface, name="test.store", version=(2, 0)):
    @rpc.method
    def pid(self) -> int: ...

    @rpc.method
    def get(self, key: str) -> Any: ...

    @rpc.method
    def vanished(self) -> None: ...


def test_unknown_methods_and_bad_arguments(server: Any, config: alpc.Config) -> None:
    with connect(config, OlderStore) as client:
        assert client.proxy.pid() == server.pid  # an older minor version is compatible
        with pytest.raises(UnknownMethod, match="no method 'vanished'"):
            client.proxy.vanished()
        with pytest.raises(BadArguments, match="missing a required argument"):
            client.proxy.get()  # type: ignore[call-arg]
        with pytest.raises(BadArguments, match="too many"):
            client.proxy.get("a", "b")  # type: ignore[call-arg]
        with pytest.raises(AttributeError):
            client.proxy.put  # noqa: B018 - not in this client's interface


def test_version_mismatch_is_rejected_at_connect(server: Any, config: alpc.Config) -> None:
    with pytest.raises(VersionMismatch, match=r"3\.0.*2\.3") as major:
        connect(config, StoreV3)
    assert isinstance(major.value, alpc.ConnectionRejected)
    with pytest.raises(VersionMismatch, match=r"2\.9"):
        connect(config, StoreV2Newer)

    class Other(rpc.Interface, name="test.other"):
        pass

    with pytest.raises(alpc.ConnectionRejected, match="not served here") as other:
        connect(config, Other)
    assert not isinstance(other.value, VersionMismatch)
    with pytest.raises(alpc.ConnectionRejected, match="not an alpc RPC client"):
        alpc.connect(NAME, b"plain bytes", config=config, timeout=10)


def test_access_by_uid_and_group(server: Any, config: alpc.Config) -> None:
    with connect(config) as client:
        with pytest.raises(AccessDenied, match=f"uid {os.getuid()}"):
            client.proxy.admin()
        assert client.proxy.members() == "members"


# -- large arguments --------------------------------------------------------------------------


def test_large_buffers_both_ways(server: Any, config: alpc.Config) -> None:
    big = os.urandom(3 * 1024 * 1024)
    with connect(config) as client:
        assert client.proxy.digest(big) == ["memoryview", True, len(big), hashlib.sha256(big).hexdigest()]
        numbers = array.array("q", range(10_000))
        assert client.proxy.digest(numbers)[2] == 80_000
        assert client.proxy.digest(bytearray(b"tiny")) == ["bytes", None, 4, hashlib.sha256(b"tiny").hexdigest()]
        blob = client.proxy.blob(2 * 1024 * 1024, 0x42)
        assert isinstance(blob, memoryview) and blob.readonly and len(blob) == 2 * 1024 * 1024
        assert bytes(blob[:4]) == b"BBBB" and blob.tobytes().count(b"B") == len(blob)
        client.proxy.put("big", big)
        assert client.proxy.get("big") == big


def test_message_limits_apply_to_rpc(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                     config: alpc.Config) -> None:
    start_server(spawn, runtime_dir, "--max-message-length", str(1024 * 1024))
    small = alpc.Config(runtime_dir=config.runtime_dir, max_message_length=512 * 1024)
    with rpc.connect(Store, NAME, config=small, timeout=10) as client:
        with pytest.raises(alpc.MessageTooLarge):
            client.proxy.digest(b"x" * (2 * 1024 * 1024))  # refused by the client before sending
        with pytest.raises(alpc.MessageTooLarge, match="remote"):
            client.proxy.blob(600 * 1024)  # the server's reply exceeds what this client accepts
        assert client.proxy.blob(10) == b"a" * 10


# -- call kinds -----------------------------------------------------------------------------


def test_one_way_calls(server: Any, config: alpc.Config) -> None:
    with connect(config) as client:
        assert client.proxy.note("first") is None
        assert server.expect("NOTE") == ["first"]
        client.proxy.note("second")
        assert client.proxy.notes() == ["first", "second"]
        with pytest.raises(MarshalError, match="one-way"):
            client.proxy.note(rpc.callback(print))  # type: ignore[arg-type]


def test_timeouts_and_the_deadline_the_server_sees(server: Any, config: alpc.Config) -> None:
    with connect(config) as client:
        remaining = client.with_timeout(5).whoami()["remaining"]
        assert 0 < remaining <= 5
        started = time.monotonic()
        with pytest.raises(alpc.Timeout):
            client.with_timeout(0.3).sleep(3, "slow")
        assert time.monotonic() - started < 2.5
        server.expect("SLEEPING")
        with pytest.raises(ValueError):
            client.with_timeout(-1)


def test_an_expired_call_is_never_started(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                          config: alpc.Config) -> None:
    server = start_server(spawn, runtime_dir, "--workers", "1")
    with connect(config) as blocker, connect(config) as late:
        results: list[Any] = []
        thread = threading.Thread(target=lambda: results.append(blocker.proxy.sleep(1.0, "blocker")))
        thread.start()
        assert server.expect("SLEEPING") == ["blocker"]
        with pytest.raises(alpc.Timeout):
            late.with_timeout(0.2).sleep(0, "late")  # queued behind the blocker until its deadline passed
        thread.join(10)
        assert late.proxy.pid() == server.pid  # after this, the late call has been taken off the queue
        assert blocker.proxy.started() == ["blocker"]


# -- cancellation -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "4"])
def test_a_started_call_cancelled_from_another_thread_stops_its_handler(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, workers: str) -> None:
    # With one worker nobody else reads the connection: the handler's poll of the flag does.
    server = start_server(spawn, runtime_dir, "--workers", workers)
    with connect(config) as client:
        pending = rpc.start_call(client.proxy.spin, "job")
        assert server.expect("SPINNING") == ["job"]
        canceller = threading.Thread(target=pending.cancel)
        canceller.start()
        canceller.join(10)
        with pytest.raises(alpc.Cancelled):
            pending.result(timeout=10)
        assert server.expect("CANCELLED") == ["job"]
        assert not pending.cancel()  # not in flight any more
        # The handler's late reply is dropped at the server; this call gets its own.
        assert client.proxy.echo("after") == [["after"], {}]
        assert rpc.start_call(client.proxy.echo, "started").result(timeout=10) == [["started"], {}]


@pytest.mark.parametrize("workers", ["1", "4"])
def test_a_call_that_times_out_is_cancelled_at_the_server(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                         config: alpc.Config, workers: str) -> None:
    server = start_server(spawn, runtime_dir, "--workers", workers)
    with connect(config) as client:
        with pytest.raises(alpc.Timeout):
            client.with_timeout(0.5).spin("blocking")
        assert server.expect("CANCELLED") == ["blocking"]
        with pytest.raises(alpc.Timeout):
            rpc.start_call(client.with_timeout(0.5).spin, "started").result()
        assert server.expect("CANCELLED") == ["started"]
        pending = rpc.start_call(client.proxy.spin, "waited")
        with pytest.raises(alpc.Timeout):
            pending.result(timeout=0.3)  # giving up waiting cancels it too
        assert server.expect("CANCELLED") == ["waited"]
        assert client.proxy.pid() == server.pid


def test_start_call_takes_only_two_way_proxy_methods(server: Any, config: alpc.Config) -> None:
    with connect(config) as client:
        with pytest.raises(TypeError, match="blocking RPC proxy"):
            rpc.start_call(print, "x")
        with pytest.raises(TypeError, match="one-way"):
            rpc.start_call(client.proxy.note, "x")
        with pytest.raises(MarshalError, match="cannot pass objects"):
            rpc.start_call(client.proxy.visit, Visitor(), 1)
        assert rpc.start_call(client.proxy.pid).result(timeout=10) == server.pid


def test_many_clients_are_served_concurrently(server: Any, config: alpc.Config) -> None:
    clients = [connect(config) for _ in range(3)]
    try:
        outcomes: list[bool] = []
        threads = [threading.Thread(target=lambda c=c: outcomes.append(c.proxy.gather(3, 10.0))) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        assert outcomes == [True, True, True]
        errors: list[BaseException] = []

        def hammer(client: rpc.Client[Any], tag: int) -> None:
            try:
                for index in range(100):
                    assert client.proxy.echo(tag, index) == [[tag, index], {}]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=hammer, args=(c, i)) for i, c in enumerate(clients * 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == []
    finally:
        for client in clients:
            client.close()


def test_concurrency_is_bounded_by_workers(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                           config: alpc.Config) -> None:
    start_server(spawn, runtime_dir, "--workers", "2")
    clients = [connect(config) for _ in range(3)]
    try:
        outcomes: list[bool] = []
        threads = [threading.Thread(target=lambda c=c: outcomes.append(c.proxy.gather(3, 0.5))) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        assert outcomes.count(True) == 0  # two workers never run three calls at once
    finally:
        for client in clients:
            client.close()


# -- callbacks ---------------------------------------------------------------------------------


class Visitor(rpc.Interface, name="test.visitor"):
    def __init__(self) -> None:
        self.threads: set[int] = set()

    @rpc.method
    def visit(self, index: int) -> int:
        self.threads.add(threading.get_ident())
        return index * 2


class Bouncer(rpc.Interface, name="test.bouncer"):
    def __init__(self, store: Any) -> None:
        self.store = store

    @rpc.method
    def back(self, depth: int) -> list[int]:
        return [os.getpid(), *self.store.bounce(self, depth)]


def test_the_server_calls_back_into_a_passed_object(server: Any, config: alpc.Config) -> None:
    with connect(config) as client:
        visitor = Visitor()
        assert client.proxy.visit(visitor, 5) == 2 * (0 + 1 + 2 + 3 + 4)
        assert visitor.threads == {threading.get_ident()}  # served on the waiting thread
        fired: list[int] = []
        assert client.proxy.fire(rpc.callback(fired.append), 3) == 3
        assert fired == [0, 1, 2]
        fired.clear()
        assert client.proxy.fire(rpc.callback(fired.append, oneway=True), 4) == 4
        assert fired == [0, 1, 2, 3]  # one-way callbacks arrive before the reply


@pytest.mark.parametrize("workers", ["1", "4"])
def test_callbacks_nest_across_processes(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                         config: alpc.Config, workers: str) -> None:
    server = start_server(spawn, runtime_dir, "--workers", workers)
    with connect(config) as client:
        pids = client.proxy.bounce(Bouncer(client.proxy), 4)
        assert pids == [server.pid, os.getpid()] * 4 + [server.pid]


def test_a_callback_is_only_valid_during_its_call(server: Any, config: alpc.Config) -> None:
    with connect(config) as client:
        client.proxy.keep(Visitor())
        with pytest.raises(UnknownMethod, match="only valid during its call"):
            client.proxy.call_kept()


def test_callbacks_from_concurrent_calls_on_one_connection(server: Any, config: alpc.Config) -> None:
    with connect(config) as client:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                for _ in range(20):
                    assert client.proxy.visit(Visitor(), 3) == 6
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == []


# -- failures ----------------------------------------------------------------------------------


def test_server_death_mid_call_raises_peer_gone(server: Any, config: alpc.Config) -> None:
    with connect(config) as client:
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                client.proxy.sleep(30, "doomed")
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        server.expect("SLEEPING")
        server.kill()
        thread.join(10)
        assert [type(e) for e in outcome] == [alpc.PeerGone]


def test_server_outlives_a_client_killed_mid_call(server: Any, config: alpc.Config, spawn: Any,
                                                  runtime_dir: Path) -> None:
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import alpc; from alpc import rpc; "
        "from rpc_peers import Store; "
        "c = rpc.connect(Store, 'svc.store', config=alpc.Config.from_env(sys.argv[2]), timeout=10); "
        "print('CONNECTED', flush=True); c.proxy.sleep(30, 'victim')"
    )
    victim = spawn.argv([sys.executable, "-c", script, str(Path(RPC_PEERS).parent), str(runtime_dir)])
    victim.expect("CONNECTED")
    assert server.expect("SLEEPING") == ["victim"]
    victim.kill()
    with connect(config) as client:
        assert client.proxy.pid() == server.pid


# -- a hostile client ----------------------------------------------------------------------------


def raw_call(envelope: Any, *segments: bytes, kind: int = Kind.CALL, version: int = RPC_VERSION) -> bytes:
    packed = envelope if isinstance(envelope, bytes) else msgpack.packb(envelope)
    table = struct.pack(f"<{len(segments)}I", *map(len, segments))
    return HEAD.pack(version, kind, len(segments)) + table + packed + b"".join(segments)


HOSTILE = [
    (b"", "MarshalError"),
    (b"\xff" * 64, "MarshalError"),
    (raw_call(b"\xc1"), "MarshalError"),
    (raw_call([0, "get"]), "MarshalError"),
    (raw_call([0, 7, [], None, None]), "MarshalError"),
    (raw_call([0, "get", "key", None, None]), "MarshalError"),
    (raw_call([0, "get", [], [], None]), "MarshalError"),
    (raw_call([0, "get", [], None, "tomorrow"]), "MarshalError"),
    (raw_call(b"\x95\x00\xa3get\xdd\xff\xff\xff\xff"), "MarshalError"),  # array of 4G elements
    (raw_call(b"\x95\x00\xa3get\x91\xdb\xff\xff\xff\xff"), "MarshalError"),  # str of 4 GiB
    (raw_call(b"\x95\x00\xa3get\x91\xc6\x7f\xff\xff\xff"), "MarshalError"),  # bin of 2 GiB
    (raw_call(b"\x91" * 5000), "MarshalError"),  # nesting deeper than the unpacker's stack
    (raw_call([0, "get", [msgpack.ExtType(42, b"?")], None, None]), "MarshalError"),
    (raw_call([0, "get", [msgpack.ExtType(Ext.BUFFER, b"\x07\0\0\0")], None, None], b"seg"), "MarshalError"),
    (raw_call([0, "get", [msgpack.ExtType(Ext.OBJECT, msgpack.packb([0, "x", {}]))], None, None]),
     "MarshalError"),  # object id 0 is never an exported object
    (raw_call([0, "get", [msgpack.ExtType(Ext.OBJECT, msgpack.packb([1, "x", {"m": 1}]))], None, None]),
     "MarshalError"),
    (HEAD.pack(RPC_VERSION, Kind.CALL, 60000) + b"\xff" * 64, "MarshalError"),
    (HEAD.pack(RPC_VERSION, Kind.CALL, 2) + struct.pack("<2I", 0xFFFFFFFF, 0xFFFFFFFF) + b"\x90", "MarshalError"),
    (raw_call([0, "get", [], None, None], kind=Kind.RESULT), "MarshalError"),
    (raw_call([0, "get", [], None, None], version=2), "MarshalError"),
    (raw_call([0, "__class__", [], None, None]), "UnknownMethod"),
    (raw_call([0, "__init__", [], None, None]), "UnknownMethod"),
    (raw_call([0, "get.__globals__", [], None, None]), "UnknownMethod"),
    (raw_call([0, "_StoreImpl__secret", [], None, None]), "UnknownMethod"),
    (raw_call([1, "get", ["k"], None, None]), "UnknownMethod"),
    (raw_call([0, "get", [1, 2, 3], None, None]), "BadArguments"),
    (raw_call([0, "get", [], {b"key": 1}, None]), "BadArguments"),
    (raw_call([0, "admin", [], None, None]), "AccessDenied"),
    (raw_call([0, "get", ["k"], None, 1.0]), "DeadlineExceeded"),
    (raw_call([0, "get", [["unhashable"]], None, None]), "TypeError"),  # the handler's own error
]


def test_a_hostile_client_gets_typed_errors_and_others_are_served(server: Any, config: alpc.Config) -> None:
    codec = Codec()
    with alpc.connect(NAME, encode_hello("test.store", (2, 3)), config=config, timeout=10) as hostile, \
            connect(config) as bystander:
        for data, expected in HOSTILE:
            reply = hostile.request(data, timeout=10)
            kind, error = codec.decode_reply(reply.data)
            assert kind is Kind.ERROR, data
            assert error.type_name == expected, (data, error)
            assert bystander.proxy.pid() == server.pid
        for data, _ in HOSTILE:
            hostile.send(data)  # datagrams: nothing to answer, the server logs and goes on
        hostile.send(raw_call([0, "note", ["from the hostile client"], None, None]))
        assert server.expect("NOTE") == ["from", "the", "hostile", "client"]
        good = hostile.request(raw_call([0, "pid", [], None, None]), timeout=10)
        assert codec.decode_reply(good.data) == (Kind.RESULT, server.pid)
    with connect(config) as client:
        assert client.proxy.pid() == server.pid


def test_a_client_that_stops_reading_replies_is_dropped(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                        config: alpc.Config) -> None:
    # Large replies travel through the connection's sections; with a small
    # section quota, the second unread reply waits for the first to be released.
    server = start_server(spawn, runtime_dir, "--reply-timeout", "0.3",
                          "--max-section-bytes", str(8 * 1024 * 1024))
    with alpc.connect(NAME, encode_hello("test.store", (2, 3)), config=config, timeout=10) as stalled:
        for _ in range(2):  # sent, never waited for (a timed-out request would be cancelled)
            stalled.start_request(raw_call([0, "blob", [6 * 1024 * 1024], None, None]), timeout=10)
        # Nobody reads those replies now: the server gives up on them and drops the connection.
        server.expect_stderr("does not read its replies", timeout=10)
        with connect(config) as client:
            assert client.proxy.pid() == server.pid
        with pytest.raises(alpc.ConnectionClosed):
            stalled.request(raw_call([0, "pid", [], None, None]), timeout=10)


def test_the_server_forgets_connections_that_end(broker: alpc.Broker, config: alpc.Config) -> None:
    from rpc_peers import StoreImpl

    def settles(expected: int) -> None:
        deadline = time.monotonic() + 10
        while server.connections != expected:
            assert time.monotonic() < deadline, server.connections
            threading.Event().wait(0.01)  # handshake-free: the notice reaches the server's own thread

    small_sections = alpc.PortAttributes(max_section_bytes=8 * 1024 * 1024)
    with rpc.Server(NAME, StoreImpl(), config=config, reply_timeout=0.3, attributes=small_sections) as server:
        first, second = connect(config), connect(config)
        assert first.proxy.pid() == second.proxy.pid() == os.getpid()
        settles(2)
        first.close()
        settles(1)
        with alpc.connect(NAME, encode_hello("test.store", (2, 3)), config=config, timeout=10) as stalled:
            settles(2)
            for _ in range(2):  # the second unread reply finds no section space
                stalled.start_request(raw_call([0, "blob", [6 * 1024 * 1024], None, None]), timeout=10)
            settles(1)  # dropped by the server for not reading its reply
        second.close()
        settles(0)


def test_serve_forever_until_stopped_and_name_reuse(broker: alpc.Broker, config: alpc.Config) -> None:
    from rpc_peers import StoreImpl

    server = rpc.Server(NAME, StoreImpl(), config=config, workers=2)
    assert "test.store 2.3" in repr(server)
    runner = threading.Thread(target=server.serve_forever, kwargs={"timeout": 30})
    runner.start()
    client = None
    deadline = time.monotonic() + 10
    while client is None:  # serve_forever creates the port on its own thread
        try:
            client = connect(config)
        except alpc.PortNotFound:
            assert time.monotonic() < deadline
            threading.Event().wait(0.01)  # handshake-free: polls for the port, bounded by the deadline
    with client:
        assert client.proxy.pid() == os.getpid() and "test.store" in repr(client)
    server.stop()
    runner.join(10)
    assert not runner.is_alive()
    with pytest.raises(RuntimeError, match="starts once"):
        server.start()
    with rpc.Server(NAME, StoreImpl(), config=config), connect(config) as again:
        assert again.proxy.pid() == os.getpid()


def test_server_arguments_are_checked() -> None:
    from rpc_peers import StoreImpl

    with pytest.raises(ValueError, match="workers"):
        rpc.Server(NAME, StoreImpl(), workers=0)
    with pytest.raises(ValueError, match="at least one"):
        rpc.Server(NAME)
    with pytest.raises(ValueError, match="two objects"):
        rpc.Server(NAME, StoreImpl(), StoreImpl())
    with pytest.raises(TypeError, match="Interface objects"):
        rpc.Server(NAME, object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Interface subclass"):
        rpc.connect(object, NAME)  # type: ignore[type-var]
    from rpc_peers import AsyncStoreImpl

    with pytest.raises(TypeError, match=r"AsyncStoreImpl\.\w+ is async: serve it with rpc.aio.Server"):
        rpc.Server(NAME, AsyncStoreImpl())
    with pytest.raises(ValueError, match="max_tasks"):
        rpc.aio.Server(NAME, AsyncStoreImpl(), max_tasks=0)


class Ping(rpc.Interface, name="test.ping", version=(1, 0)):
    @rpc.method
    def ping(self) -> str:
        return "pong from " + rpc.current_call().interface


def test_one_port_serves_several_interfaces(broker: alpc.Broker, config: alpc.Config) -> None:
    from rpc_peers import StoreImpl

    with rpc.Server(NAME, StoreImpl(), Ping(), config=config):
        with connect(config) as store, connect(config, Ping) as ping:
            assert ping.proxy.ping() == "pong from test.ping"
            assert store.proxy.pid() == os.getpid()
            assert ping.server.pid == store.server.pid == os.getpid()

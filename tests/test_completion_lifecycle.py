"""CompletionPort, second pass: on_connect raising, a plain handler returning an awaitable,
and an ordered client dying with requests queued.

Clients are real processes (tests/completion_lifecycle_peers.py) driven one line at a time; the server's
steps are ordered with events, never sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "completion_lifecycle_peers.py"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def client(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(name: str, *args: str, connected: bool = True):  # type: ignore[no-untyped-def]
        peer = spawn.argv([sys.executable, str(PEERS), name, "--runtime-dir", str(runtime_dir), *args])
        if connected:
            peer.expect("CONNECTED")
        return peer
    return start


@contextlib.contextmanager
def serving(completion: alpc.CompletionPort, failed: list[BaseException] | None = None) -> Iterator[None]:
    """serve() on a thread until the block ends; what it raised goes into ``failed`` (checked
    at the end when not given)."""
    raised: list[BaseException] = [] if failed is None else failed

    def serve() -> None:
        try:
            completion.serve(timeout=60)
        except BaseException as exc:  # reported by the caller
            raised.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        completion.stop()
        thread.join(15)
        assert not thread.is_alive(), "serve() did not return after stop()"
    if failed is None:
        assert not raised, f"serve() raised {raised[0]!r}"


def ask(peer: Any, tag: str, seconds: float = 10) -> list[str]:
    peer.send(f"start {tag}")
    peer.expect("STARTED")
    peer.send(f"wait {tag} {seconds}")
    return peer.expect("")  # type: ignore[no-any-return]


def finish(*peers: Any) -> None:
    for peer in peers:
        peer.send("quit")
        peer.expect("BYE")
        peer.proc.wait(10)


# -- on_connect raising -----------------------------------------------------------------------


def test_an_on_connect_that_raises_refuses_that_client_and_the_pool_serves_on(broker, config, client) -> None:  # type: ignore[no-untyped-def]
    """max_workers=2: client A's handler blocks one pool thread, so the other one waits on the
    port and runs on_connect for client B, which raises. The exception left _lead: that
    thread ended (or serve() itself raised), B's request was never answered (its connect
    timed out), and nobody waited on the port any more, so client C was not served until
    A's handler returned. It should be logged like a handler's failure: B refused, C served."""
    entered = threading.Event()
    release = threading.Event()
    connects: list[int] = []
    failed: list[BaseException] = []

    def handle(message: alpc.Message) -> bytes:
        if message.data == b"block":
            entered.set()
            release.wait(30)
        return message.data.upper()

    def on_connect(request: alpc.ConnectionRequest) -> bool:
        connects.append(request.client.pid)
        if len(connects) == 2:
            raise RuntimeError("injected: on_connect fails for the second client")
        return True

    with alpc.create_port("iocp4.onconnect", config=config) as port:
        completion = alpc.CompletionPort(port, handle, on_connect=on_connect, max_workers=2, idle_timeout=60)
        try:
            with serving(completion, failed):
                a = client("iocp4.onconnect")
                a.send("start block")
                a.expect("STARTED")
                assert entered.wait(10), "A's handler never ran"
                b = client("iocp4.onconnect", "--connect-timeout", "5", connected=False)
                b_outcome = b.expect("")
                c = client("iocp4.onconnect", "--connect-timeout", "5", connected=False)
                c_outcome = c.expect("")
                c_reply = ask(c, "c", 5) if c_outcome[0] == "CONNECTED" else None
                release.set()
                a.send("wait block 10")
                assert a.expect("") == ["REPLY", "block", "BLOCK"]
                finish(a)
                if c_reply is not None:
                    finish(c)
        finally:
            release.set()
    assert b_outcome == ["REFUSED", "ConnectionRejected"], b_outcome
    assert c_outcome[0] == "CONNECTED", c_outcome
    assert c_reply == ["REPLY", "c", "C"], c_reply
    assert not failed, f"serve() raised {failed[0]!r}"


# -- a plain callable that returns an awaitable ----------------------------------------------------


async def _upper_async(message: alpc.Message) -> bytes:
    return message.data.upper()


class _AsyncCallable:
    async def __call__(self, message: alpc.Message) -> bytes:
        return message.data.upper()


@pytest.mark.parametrize("handler", [lambda message: _upper_async(message), _AsyncCallable()],
                         ids=["lambda", "async-call"])
def test_a_handler_returning_an_awaitable_replies_with_its_result(broker, config, client, handler) -> None:  # type: ignore[no-untyped-def]
    """``Handler`` lets a plain callable return an awaitable (a lambda wrapping an async def,
    an object with ``async def __call__``): neither is a coroutine function, so it ran as a
    sync handler, whose coroutine was never awaited, and the client got an empty reply."""
    with alpc.create_port("iocp4.awaitable", config=config) as port:
        completion = alpc.CompletionPort(port, handler, max_workers=2)
        with serving(completion):
            peer = client("iocp4.awaitable")
            reply = ask(peer, "abc")
            finish(peer)
    assert reply == ["REPLY", "abc", "ABC"], reply


# -- an ordered client that dies with requests queued ---------------------------------------------


class Watched(alpc.CompletionPort):
    """A CompletionPort that says when client A's turn (ordered: A1 and what waited behind it
    in A's inbox) is over, and when a client's end reached the port while its turn was out."""

    def __init__(self, port: alpc.ConnectionPort, *args: Any, **kwargs: Any) -> None:
        super().__init__(port, *args, **kwargs)
        self.died = threading.Event()
        self.a_done = threading.Event()
        park = port._park

        def parked(comm: Any) -> None:
            park(comm)
            self.died.set()

        port._park = parked  # type: ignore[method-assign]

    def _next_for(self, message: alpc.Message, after_take: Any) -> alpc.Message | None:
        following = super()._next_for(message, after_take)
        if following is None and message.data.startswith(b"A"):
            self.a_done.set()
        return following


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_ordered_client_that_died_has_its_queued_requests_dropped(broker, config, client, kind) -> None:  # type: ignore[no-untyped-def]
    """ordered=True: client A's A1 runs (blocked), A2 and A3 wait behind it, and A is
    SIGKILLed. Once A1 returns, A2 and A3 were still handed to the handler one after the
    other, for a client that is gone and can never read a reply: a client that queues
    costly requests and dies keeps a pool thread (or slot) busy for all of them."""
    running = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    def handle_sync(message: alpc.Message) -> bytes:
        tag = message.data.decode()
        seen.append(tag)
        if tag == "A1":
            running.set()
            release.wait(30)
        return tag.lower().encode()

    async def handle_async(message: alpc.Message) -> bytes:
        tag = message.data.decode()
        seen.append(tag)
        if tag == "A1":
            running.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        return tag.lower().encode()

    handle = handle_sync if kind == "sync" else handle_async

    with alpc.create_port("iocp4.died", config=config) as port:
        completion = Watched(port, handle, ordered=True, max_workers=2, idle_timeout=60)
        try:
            with serving(completion):
                a = client("iocp4.died")
                a.send("start A1")
                a.expect("STARTED")
                assert running.wait(10), "A1 never ran"
                for tag in ("A2", "A3"):
                    a.send(f"start {tag}")
                    a.expect("STARTED")
                a.send("ping")  # A2 and A3 are in A's inbox, behind A1, once the port answers
                a.expect("PONG")
                a.kill()
                assert completion.died.wait(10), "A's death never reached the port"
                release.set()
                assert completion.a_done.wait(10), "A's turn never ended"
                b = client("iocp4.died")
                assert ask(b, "b") == ["REPLY", "b", "b"]
                finish(b)
        finally:
            release.set()
    assert seen == ["A1", "b"], f"handled for a dead client: {seen}"


# -- the port's name lost while the broker is away ----------------------------------------------


def test_a_lost_registration_does_not_end_serve(spawn, runtime_dir: Path, config, client) -> None:  # type: ignore[no-untyped-def]
    """The broker is SIGKILLed and the port gives its name up (reregister_timeout runs out):
    port.wait() raises BrokerUnavailable once, then keeps delivering messages, and
    established clients keep working (README "Restarts without loss"). The completion port
    let that exception out of _lead: serve() raised (a pool thread would have died) and
    nobody served the clients already connected."""
    broker = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker"])
    broker.expect("READY")
    gave_up = threading.Event()

    class GaveUp(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "no longer registered" in record.getMessage():
                gave_up.set()

    watcher = GaveUp()
    logging.getLogger("alpc").addHandler(watcher)
    failed: list[BaseException] = []
    try:
        with alpc.create_port("iocp4.orphan", config=config, reregister_timeout=0.2) as port:
            completion = alpc.CompletionPort(port, lambda message: message.data.upper(), max_workers=1)
            with serving(completion, failed):
                a = client("iocp4.orphan")
                assert ask(a, "before") == ["REPLY", "before", "BEFORE"]
                broker.kill()
                assert gave_up.wait(10), "the port never gave its name up"
                after = ask(a, "after", 5)
                finish(a)
    finally:
        logging.getLogger("alpc").removeHandler(watcher)
        (runtime_dir / "broker.sock").unlink(missing_ok=True)  # a SIGKILLed broker leaves them
        (runtime_dir / "broker.lock").unlink(missing_ok=True)
    assert after == ["REPLY", "after", "AFTER"], after
    assert not failed, f"serve() raised {failed[0]!r}"


# -- an async on_connect -------------------------------------------------------------------------


def test_an_async_on_connect_is_awaited_and_can_refuse(broker, config, client) -> None:  # type: ignore[no-untyped-def]
    """on_connect's verdict was bool(on_connect(request)): an ``async def`` returned a coroutine,
    always true, so every client was let in, those it meant to refuse included (and the
    coroutine was never awaited). It is awaited on the private loop, as a handler's awaitable."""
    seen: list[int] = []

    async def on_connect(request: alpc.ConnectionRequest) -> bool:
        seen.append(request.client.pid)
        return len(seen) != 1  # the first client is refused

    with alpc.create_port("completion.async.onconnect", config=config) as port:
        completion = alpc.CompletionPort(port, lambda message: message.data.upper(), on_connect=on_connect)
        with serving(completion):
            refused = client("completion.async.onconnect", "--connect-timeout", "5", connected=False)
            assert refused.expect("") == ["REFUSED", "ConnectionRejected"]
            admitted = client("completion.async.onconnect")
            assert ask(admitted, "x", 5) == ["REPLY", "x", "X"]
            finish(admitted)
    assert len(seen) == 2

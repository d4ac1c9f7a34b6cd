"""The connect / accept / reject handshake against hostile or dying peers, and racing closes.

Each test names what it proves; the peers are raw sockets (or a fake broker) in this
process, synchronised by what the kernel shows (a readable socket, a thread asleep in
poll), never by sleeps.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from pathlib import Path

import pytest

import alpc
import alpc.aio
from alpc import control
from alpc.config import ensure_runtime_dir
from alpc.exchange import control_frame
from alpc.transport import Listener, wait_readable
from alpc.wire import FrameDecoder, FrameLimits, MessageType, encode_frame

NOBODY = 65534
MIB = 1024 * 1024
# The most connect data a port or client may allow (the broker reads requests of at most 1 MiB).
MAX_CONNECT_DATA = getattr(alpc.config, "MAX_CONNECT_DATA", 512 * 1024)
# The syscalls a thread blocked in listen()/wait() sleeps in (x86_64 numbers: poll, epoll_wait, ppoll, epoll_pwait).
_POLL_SYSCALLS = {"7", "232", "271", "281", "441"}


# -- connect data the broker cannot carry -------------------------------------------


@pytest.mark.timeout(30)
def test_a_max_connect_data_beyond_what_the_broker_reads_is_refused_at_once() -> None:
    """The broker reads requests of at most 1 MiB and drops longer ones without a word, so a
    port and client that both allowed 2 MiB turned a 1.5 MiB connect into BrokerUnavailable (or
    PeerGone), both retried by connect(retry_timeout=): the limit must be refused up front."""
    with pytest.raises(ValueError, match="max_connect_data"):
        alpc.PortAttributes(max_connect_data=2 * MIB)
    with pytest.raises(ValueError, match="max_connect_data"):
        alpc.Config(max_connect_data=2 * MIB)
    with pytest.raises(ValueError, match="max_connect_data"):
        alpc.Config(max_connect_data=-1)


@pytest.mark.timeout(30)
def test_connect_data_of_the_largest_allowed_size_reaches_the_server(broker: alpc.Broker,
                                                                     runtime_dir: Path) -> None:
    config = alpc.Config(runtime_dir=runtime_dir, max_connect_data=MAX_CONNECT_DATA)
    attributes = alpc.PortAttributes(max_connect_data=MAX_CONNECT_DATA)
    payload = os.urandom(MAX_CONNECT_DATA)
    outcome: list[object] = []

    def client() -> None:
        try:
            outcome.append(alpc.connect("svc.hshk.full", data=payload, config=config, timeout=10))
        except BaseException as exc:  # reported below
            outcome.append(exc)

    with alpc.create_port("svc.hshk.full", attributes, config=config) as port:
        thread = threading.Thread(target=client)
        thread.start()
        request = port.listen(timeout=10)
        assert request.data == payload
        served = request.accept(data=b"ok")
        thread.join(10)
        (comm,) = outcome
        assert isinstance(comm, alpc.CommunicationPort), comm
        assert comm.accept_data == b"ok"
        comm.close()
        served.close()


# -- a pinned server uid and a rejection from someone else ------------------------------------


def _fake_broker_answers(listener: Listener, reply: control.ConnectionReply) -> None:
    """Play a lying broker: read the CONNECT and answer it ourselves (as this process's uid)."""
    assert wait_readable([listener.fileno()], time.monotonic() + 10)
    stream = listener.accept()
    assert stream is not None
    try:
        decoder = FrameDecoder(FrameLimits(allowed_types=frozenset({MessageType.CONNECT}), max_data=1 << 20))
        frames: list[object] = []
        while not frames:
            assert wait_readable([stream.fileno()], time.monotonic() + 10)
            data = stream.recv()
            assert data
            frames = decoder.feed(data)
        stream.send(control_frame(reply))
        # Hold the socket until the client hung up, so its verdict comes from the reply alone.
        while wait_readable([stream.fileno()], time.monotonic() + 10) and stream.recv():
            pass
    finally:
        stream.close()


@pytest.mark.timeout(30)
def test_a_pinned_client_refuses_a_rejection_from_the_wrong_uid(runtime_dir: Path) -> None:
    """With server_uid pinned, a reply from another uid is an impostor's, whatever it says: its
    reject reason must not reach the caller as the server's ConnectionRejected."""
    ensure_runtime_dir(runtime_dir)
    listener = Listener.bind(runtime_dir / "broker.sock")
    config = alpc.Config(runtime_dir=runtime_dir)
    outcome: list[BaseException] = []

    def client() -> None:
        try:
            alpc.connect("svc.hshk.pinned", config=config, timeout=10, server_uid=NOBODY).close()
        except BaseException as exc:  # reported below
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        _fake_broker_answers(listener, control.ConnectionReply(
            accepted=False, data=b"", reason="version 9.9 required: upgrade from evil.example", max_message_length=0))
        thread.join(10)
    finally:
        listener.close()
    (error,) = outcome
    assert isinstance(error, alpc.AccessDenied), repr(error)
    assert not isinstance(error, alpc.ConnectionRejected)
    assert f"not the required uid {NOBODY}" in str(error)


# -- an accept racing the port's close ------------------------------------------------------


def _raw_connect(config: alpc.Config, name: str) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.connect(str(config.broker_socket))
    raw.sendall(b"".join(control_frame(control.Connect(name=name, data=b"", max_message_length=1 << 20,
                                                       max_section_bytes=1 << 20))))
    return raw


def _readable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


@pytest.mark.timeout(60)
def test_an_accept_that_finishes_after_the_port_closed_ends_its_connection(broker: alpc.Broker,
                                                                           runtime_dir: Path) -> None:
    """close() closes every connection; one whose accept was still writing its reply must not
    survive it as an open connection nobody's port knows (the client held on for ever)."""
    accept_data = 3 * MAX_CONNECT_DATA // 4
    with open("/proc/sys/net/core/wmem_default") as limit:
        if int(limit.read()) + 64 * 1024 >= accept_data:
            pytest.skip("the default socket send buffer holds the whole accept reply")
    config = alpc.Config(runtime_dir=runtime_dir, max_connect_data=MAX_CONNECT_DATA)
    port = alpc.create_port("svc.hshk.race", config=config)
    raw = _raw_connect(config, "svc.hshk.race")
    outcome: list[object] = []
    try:
        request = port.listen(timeout=10)

        def accept() -> None:
            try:
                outcome.append(request.accept(data=b"a" * accept_data, timeout=20))
            except BaseException as exc:  # reported below
                outcome.append(exc)

        thread = threading.Thread(target=accept)
        thread.start()
        # The reply is more than the server's socket buffers: its accept is blocked writing it.
        assert _readable(raw, 10)
        port.close()
        received = 0
        while received < accept_data:  # let the accept finish, after the close
            chunk = raw.recv(1 << 20)
            assert chunk
            received += len(chunk)
        thread.join(20)
        (result,) = outcome
        if isinstance(result, alpc.CommunicationPort):
            result.close()
        assert isinstance(result, alpc.ConnectionClosed), f"accept on a closed port gave {result!r}"
        # The client is told: its end reaches EOF after what was written.
        tail = b""
        while chunk := raw.recv(1 << 20):
            tail += chunk
        assert len(tail) < 64
    finally:
        raw.close()
        port.close()


# -- close() from another thread wakes listen() and wait() ---------------------------------


def _asleep_in_poll(tid: int) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/syscall") as state:
            return state.read().split()[0] in _POLL_SYSCALLS
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["listen", "wait"])
def test_close_wakes_a_thread_blocked_waiting_on_the_port(broker: alpc.Broker, config: alpc.Config,
                                                           method: str) -> None:
    """A thread in listen()/wait() with a long timeout sees ConnectionClosed as soon as another
    thread closes the port, not once its timeout ran out (never, for timeout=None)."""
    port = alpc.create_port(f"svc.hshk.{method}", config=config)
    outcome: list[tuple[BaseException, float]] = []
    tid: list[int] = []

    def waiter() -> None:
        tid.append(threading.get_native_id())
        started = time.monotonic()
        try:
            getattr(port, method)(timeout=8)
        except BaseException as exc:  # reported below
            outcome.append((exc, time.monotonic() - started))

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        give_up = time.monotonic() + 10
        while not (tid and _asleep_in_poll(tid[0])):  # a handshake with the kernel: it sleeps in poll now
            assert time.monotonic() < give_up, "the waiter never blocked"
            os.sched_yield()
        port.close()
        thread.join(15)
    finally:
        port.close()
    ((error, waited),) = outcome
    assert isinstance(error, alpc.ConnectionClosed), repr(error)
    assert waited < 5, f"{method}() woke {waited:.1f}s after the close"


# -- limits a client announces in its connect -------------------------------------------------


def _raw_connect_announcing(config: alpc.Config, name: str, max_message_length: int,
                            max_section_bytes: int) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.connect(str(config.broker_socket))
    raw.sendall(b"".join(control_frame(control.Connect(
        name=name, data=b"", max_message_length=max_message_length, max_section_bytes=max_section_bytes))))
    return raw


def _answer_or_eof(raw: socket.socket) -> list[object]:
    """The frames the client gets before its socket ends (the server, or the broker, hung up)."""
    decoder = FrameDecoder(FrameLimits(allowed_types=frozenset({MessageType.CONNECTION_REPLY, MessageType.ERROR}),
                                       max_data=1 << 20))
    frames: list[object] = []
    while data := raw.recv(65536):
        frames += decoder.feed(data)
        if frames:
            # Accepted: ask something, then wait for whatever comes (nothing, for a dead server).
            raw.sendall(encode_frame(MessageType.REQUEST, b"ping", message_id=1))
            break
    return frames


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("max_message_length", "max_section_bytes"), [(-1, 1 << 20), (0, 1 << 20), (1 << 40, 1 << 20)])
def test_a_client_announcing_an_impossible_message_length_cannot_stop_a_completion_port(
        broker: alpc.Broker, config: alpc.Config, max_message_length: int, max_section_bytes: int) -> None:
    """max_message_length is checked like the flow limits: a value no honest client announces
    (Config keeps it in 1..2**32-1) never reaches a server. Accepted, a client announcing -1
    made every reply, even an empty one, raise MessageTooLarge, and the completion port's
    fallback empty reply raised out of serve(): one request ended the server for everyone."""
    with alpc.create_port("svc.hshk.limits", config=config) as port:
        pool = alpc.CompletionPort(port, lambda message: b"pong", max_workers=1)
        failures: list[BaseException] = []

        def serve() -> None:
            try:
                pool.serve()
            except BaseException as exc:  # reported below
                failures.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            raw = _raw_connect_announcing(config, "svc.hshk.limits", max_message_length, max_section_bytes)
            try:
                frames = _answer_or_eof(raw)
            finally:
                raw.close()
            with alpc.connect("svc.hshk.limits", config=config, timeout=5) as honest:
                assert honest.request(b"ping", timeout=5).data == b"pong"
            assert not frames, "a connect announcing an impossible max_message_length was accepted"
        finally:
            pool.stop()
            thread.join(10)
        assert not failures, failures


@pytest.mark.timeout(60)
def test_close_wakes_an_asyncio_listen(broker: alpc.Broker, config: alpc.Config) -> None:
    """The asyncio port's listen() waits on the same link: closing the port must end it (serve()
    waits with no timeout while clients are connected, so it hung for good after close())."""
    async def scenario() -> tuple[BaseException, float]:
        port = await alpc.aio.create_port("svc.hshk.aio", config=config)
        started = time.monotonic()
        waiting = asyncio.create_task(port.listen(timeout=8))
        await asyncio.sleep(0)  # handshake-free: one loop turn (FIFO), the task now awaits the link
        await port.close()
        try:
            await waiting
        except BaseException as exc:  # reported below
            return exc, time.monotonic() - started
        raise AssertionError("listen() returned a request nobody sent")

    error, waited = asyncio.run(scenario())
    assert isinstance(error, alpc.ConnectionClosed), repr(error)
    assert waited < 5, f"listen() woke {waited:.1f}s after the close"

"""fd (handle) passing against a hostile peer: fds parked behind unfinished frames, and both read paths.

Every test uses real sockets (and, end to end, real peer processes); none sleeps to synchronise.
"""

from __future__ import annotations

import fcntl
import os
import queue
import sys
import time
from pathlib import Path

import pytest

import alpc
from alpc.errors import ProtocolError
from alpc.protocol import Channel, ConnectionPolicy
from alpc.quotas import FlowLimits
from alpc.security import HandleKind, PeerCred
from alpc.transport import Stream
from alpc.wire import MessageType, encode_frame

HOSTILE_PEERS = Path(__file__).resolve().parent / "hostile_peers.py"
PARKING_PEERS = Path(__file__).resolve().parent / "fd_parking_peers.py"
KINDS = ("--kinds", "pipe,memfd", "--max-handles", "2", "--max-inflight", "4")

pytestmark = pytest.mark.timeout(60)


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _policy() -> ConnectionPolicy:
    limits = FlowLimits(max_handles_per_message=2, max_inflight_handles=4)
    kinds = frozenset({HandleKind.PIPE})
    return ConnectionPolicy(local=limits, peer=limits, accept_kinds=kinds, peer_kinds=kinds)


def _read_all(stream: Stream, channel: Channel, max_fds: int) -> None:
    """Feed the channel every read waiting in the socket (the port's own read path)."""
    while True:
        got = stream.read(0.0, max_fds)
        if not got:
            return
        data, fds, sender, truncated = got  # type: ignore[misc]
        channel.receive(data, fds, sender, truncated)


# -- 1. fds parked behind a frame that never completes --------------------------------------


def test_fds_dribbled_behind_an_unfinished_frame_are_refused_not_hoarded() -> None:
    """A peer sends a frame one byte per write, each write with as many fds as a read takes.

    No frame completes, so no frame ever claims those fds, and the decoder queues them
    all: max_handles_per_message=2 and max_inflight_handles=4 bound nothing. The
    receiver must refuse the second batch (an honest sender's fds are claimed by the
    frames of their own write before the next write's fds can arrive).
    """
    sender, receiver = Stream.pair()
    read_end, write_end = os.pipe()
    try:
        receiver.set_passcred(True)
        me = PeerCred(os.getpid(), os.getuid(), os.getgid())
        channel = Channel(me, send_limit=1 << 20, recv_limit=1 << 20, local_pid=os.getpid(), policy=_policy())
        max_fds = 1 + channel.policy.local.max_handles_per_message  # what the port reads at once
        frame = encode_frame(MessageType.DATAGRAM, b"x" * 100, message_id=1)
        before = _open_fd_count()
        refused = False
        for index in range(60):
            sender.send([frame[index:index + 1]], [read_end] * max_fds)
            try:
                _read_all(receiver, channel, max_fds)
            except ProtocolError:
                refused = True
                channel.mark_closed("protocol error")
                break
        held = _open_fd_count() - before
        channel.mark_closed("done")
        assert refused, f"60 writes of {max_fds} fds behind an unfinished frame were all taken; {held} fds held"
        assert held <= max_fds
    finally:
        sender.close()
        receiver.close()
        os.close(read_end)
        os.close(write_end)


def _server_lines_until(server, want: tuple[str, ...], deadline: float) -> str:  # type: ignore[no-untyped-def]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"none of {want} from the server in time")
        try:
            line = server._lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError(f"the server exited; stderr: {server.stderr()}")
        if line.startswith(want):
            return line


def test_a_server_is_not_filled_with_fds_parked_behind_an_unfinished_frame(broker: alpc.Broker,  # type: ignore[no-untyped-def]
                                                                          config: alpc.Config, spawn) -> None:
    """End to end: a hostile client parks fds in a server (2 per message, 4 in flight) without
    ever completing a frame. The server must drop it (CLIENT_DIED) before it holds more than
    one message's worth; today its fd count just grows with every write."""
    server = spawn.argv([sys.executable, str(HOSTILE_PEERS), "server", "svc.park", "--runtime-dir",
                         str(config.runtime_dir), *KINDS])
    server.expect("READY")
    hostile = alpc.connect("svc.park", config=config, timeout=5)
    read_end, write_end = os.pipe()
    try:
        server.expect("ACCEPTED")
        server.send("fds")
        baseline = int(server.expect("FDS")[0])
        frame = encode_frame(MessageType.DATAGRAM, b"x" * 100, message_id=1)
        writes = 0
        for index in range(40):
            try:
                hostile._stream.send([frame[index:index + 1]], [read_end] * 3)
            except alpc.ConnectionClosed:
                break  # dropped already: what an honest receiver does
            writes += 1
        # Ask for the fd count until the server either dropped us or holds more than 3 + 4 fds of ours.
        deadline = time.monotonic() + 20
        while True:
            server.send("fds")
            line = _server_lines_until(server, ("FDS", "CLIENT_DIED"), deadline)
            if line.startswith("CLIENT_DIED"):
                break
            held = int(line.split()[1]) - baseline
            assert held <= 3 + 4, f"after {writes} writes the server holds {held} more fds, no frame complete"
    finally:
        os.close(read_end)
        os.close(write_end)
        hostile.close()


def test_a_connect_whose_reply_never_completes_leaks_no_fd(broker: alpc.Broker, config: alpc.Config,  # type: ignore[no-untyped-def]
                                                          spawn) -> None:
    """A hostile server answers a connect with the first byte of its reply and a pipe, then
    stalls. The client's connect times out; the pipe the server slipped in must be closed
    (today it stays queued in a decoder nobody closes, for the life of the client)."""
    server = spawn.argv([sys.executable, str(PARKING_PEERS), "dribble-server", "svc.dribble", "--runtime-dir",
                         str(config.runtime_dir)])
    server.expect("READY")
    before = _open_fd_count()
    with pytest.raises(alpc.Timeout):
        # The timeout is the outcome under test (the reply never completes), not a synchronisation.
        alpc.connect("svc.dribble", config=config, timeout=2)
    server.expect("DRIBBLED")
    pipes = [fd for fd in os.listdir("/proc/self/fd") if _target(int(fd)).startswith("pipe:")]
    assert _open_fd_count() <= before, f"the stalled connect left fds open: {pipes}"


def _target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# -- 2. the two read paths: close-on-exec and stray pidfds ----------------------------------


def _cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def test_received_handles_are_close_on_exec_on_every_read_path() -> None:
    """The C read asks for MSG_CMSG_CLOEXEC; the pure-Python twin (recv_fds: ALPC_PUREPYTHON=1,
    and every asyncio connection even with the extension) and recv_with_ancillary do not, so
    a peer's fds are inherited by whatever the receiver execs next."""
    sender, receiver = Stream.pair()
    read_end, write_end = os.pipe()
    got: list[int] = []
    try:
        receiver.set_passcred(True)
        results = {}
        sender.send([b"a"], [read_end])
        _, fds, _, _ = receiver.read(None, 3)  # type: ignore[misc]
        got += fds
        results["read"] = [_cloexec(fd) for fd in fds]
        sender.send([b"b"], [read_end])
        _, fds, _, _ = receiver.recv_fds(3)  # type: ignore[misc]
        got += fds
        results["recv_fds"] = [_cloexec(fd) for fd in fds]
        sender.send([b"c"], [read_end])
        received = receiver.recv_with_ancillary(max_fds=3, want_cred=True)
        assert received is not None
        got += received.fds
        results["recv_with_ancillary"] = [_cloexec(fd) for fd in received.fds]
        assert results == {"read": [True], "recv_fds": [True], "recv_with_ancillary": [True]}, results
    finally:
        for fd in got:
            os.close(fd)
        sender.close()
        receiver.close()
        os.close(read_end)
        os.close(write_end)


def test_an_asyncio_server_gets_handles_that_do_not_survive_exec(broker: alpc.Broker,  # type: ignore[no-untyped-def]
                                                                config: alpc.Config, spawn) -> None:
    """End to end: a client passes a pipe to an asyncio server; the fd the server's
    application receives must be close-on-exec (it is not: aio reads with recv_fds)."""
    import asyncio

    from alpc import aio

    async def main() -> bool:
        attributes = alpc.PortAttributes(handle_kinds={"pipe"})
        async with await aio.create_port("svc.aiofd", attributes, config=config) as port:
            loop = asyncio.get_running_loop()
            client = spawn.argv([sys.executable, str(HOSTILE_PEERS), "client", "svc.aiofd", "--runtime-dir",
                                 str(config.runtime_dir), "--kinds", "pipe"])
            request = await port.listen(timeout=10)
            comm = await request.accept()
            try:
                await loop.run_in_executor(None, client.expect, "READY")
                client.send("sendfd pipe")
                message = await comm.receive(timeout=10)
                handles = message.take_handles()
                try:
                    assert [h.kind for h in handles] == [HandleKind.PIPE]
                    return _cloexec(handles[0].fd)
                finally:
                    for handle in handles:
                        os.close(handle.fd)
            finally:
                await comm.close()

    assert asyncio.run(main()), "the passed pipe would be inherited by a child the server execs"


def test_a_stray_pidfd_is_closed_by_both_read_paths() -> None:
    """The C read closes an SCM_PIDFD it was not asked for; recv_fds (its pure-Python twin)
    drops it on the floor, open. (A channel turns SO_PASSPIDFD off after the handshake, so a
    peer cannot trigger this today: it is a divergence of the twins.)"""
    sender, receiver = Stream.pair()
    try:
        receiver.set_passcred(True)
        if not receiver.set_passpidfd(True):
            pytest.skip("no SO_PASSPIDFD in this kernel")
        leaked = {}
        for name, read in (("read", lambda: receiver.read(None, 3)), ("recv_fds", lambda: receiver.recv_fds(3))):
            before = _open_fd_count()
            sender.send([b"x"])
            got = read()
            assert got and got[0] == b"x"  # type: ignore[index]
            leaked[name] = _open_fd_count() - before
        assert leaked == {"read": 0, "recv_fds": 0}, leaked
    finally:
        sender.close()
        receiver.close()


# -- 3. sound today: kept as regression tests -------------------------------------------------


def test_fds_of_a_frame_cut_off_by_a_hang_up_are_closed(broker: alpc.Broker, config: alpc.Config,  # type: ignore[no-untyped-def]
                                                       spawn) -> None:
    """A client sends the first byte of a frame with fds and hangs up: the server closes them."""
    server = spawn.argv([sys.executable, str(HOSTILE_PEERS), "server", "svc.cutoff", "--runtime-dir",
                         str(config.runtime_dir), *KINDS])
    server.expect("READY")
    with alpc.connect("svc.cutoff", config=config, timeout=5) as honest:
        server.expect("ACCEPTED")
        server.send("fds")
        baseline = int(server.expect("FDS")[0])
        hostile = alpc.connect("svc.cutoff", config=config, timeout=5)
        server.expect("ACCEPTED")
        read_end, write_end = os.pipe()
        try:
            frame = encode_frame(MessageType.DATAGRAM, b"x" * 10, message_id=1, n_fds=2)
            hostile._stream.send([frame[:1]], [read_end, read_end])
        finally:
            os.close(read_end)
            os.close(write_end)
        hostile._stream.shutdown()
        hostile.close()
        assert "mid-frame" in " ".join(server.expect("CLIENT_DIED"))
        assert honest.request(b"echo:after", timeout=5).data == b"AFTER"  # the server got past the notice
        server.send("fds")
        assert int(server.expect("FDS")[0]) == baseline


def test_a_cancelled_request_with_fds_gives_them_and_its_window_back(broker: alpc.Broker,  # type: ignore[no-untyped-def]
                                                                    config: alpc.Config, spawn) -> None:
    """Requests carrying fds, cancelled before the paused server read them: their fds are closed
    at the server and the in-flight fd window (4) opens again for the same client."""
    server = spawn.argv([sys.executable, str(HOSTILE_PEERS), "server", "svc.cancelfd", "--runtime-dir",
                         str(config.runtime_dir), *KINDS, "--pause-after", "1"])
    server.expect("READY")
    client_config = alpc.Config(runtime_dir=config.runtime_dir, handle_kinds=frozenset({"pipe"}))
    with alpc.connect("svc.cancelfd", config=client_config, timeout=5) as comm:
        server.expect("ACCEPTED")
        server.expect("PAUSED")
        server.send("fds")
        baseline = int(server.expect("FDS")[0])
        read_end, write_end = os.pipe()
        try:
            for _ in range(2):  # 2 + 2: the window (4) is full
                pending = comm.start_request(b"echo:x", timeout=5, fds=[read_end, read_end])
                assert pending.cancel()
                with pytest.raises(alpc.Cancelled):
                    pending.result(timeout=5)
            server.send("go")
            # Once the server read the cancels and answered for them, the window opens again.
            assert comm.request(b"echo:open", timeout=10, fds=[read_end, read_end]).data == b"OPEN"
        finally:
            os.close(read_end)
            os.close(write_end)
        server.send("fds")
        assert int(server.expect("FDS")[0]) == baseline

"""A broker successor that cannot finish a handover, and state a predecessor must not be trusted with."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import pytest

import alpc
import alpc.broker
from alpc import control, handover
from alpc.exchange import control_frame, read_frame
from alpc.transport import Stream
from alpc.wire import HEADER_SIZE, FrameDecoder, FrameLimits, MessageType

OPS = Path(__file__).resolve().parent / "ops_peers.py"


def _cli_broker(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    broker = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker"])
    assert broker.expect("READY") == [str(runtime_dir / "broker.sock")]
    return broker


def _sockets_open() -> set[str]:
    """The kernel objects (``socket:[inode]``) this process holds an fd of."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return found


@pytest.mark.timeout(60)
def test_a_successor_that_loses_the_lock_race_closes_what_it_took(
        spawn, runtime_dir: Path, config: alpc.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process takes the lock between the old broker letting go and the successor claiming it.

    The successor then fails with BrokerRunning. It must close every socket it
    was handed: otherwise the server's registration socket stays open in it,
    the server never sees an EOF and never registers with the broker that
    serves the runtime dir next.
    """
    old = _cli_broker(spawn, runtime_dir)
    server = spawn.argv([sys.executable, str(OPS), "server", "svc.orphaned", "--runtime-dir", str(runtime_dir)])
    server.expect("READY")
    real = handover.request_handover
    third = []
    rival: list[int] = []
    taken: set[str] = set()

    def racing(cfg: alpc.Config, timeout: float = handover.HANDOVER_TIMEOUT):  # type: ignore[no-untyped-def]
        state = real(cfg, timeout)
        taken.update(os.readlink(f"/proc/self/fd/{fd}") for fd in
                     [state.listener.fileno()] + [peer.stream.fileno() for peer in state.peers])
        # The old broker has released its lock: a rival claims it now. (A plain `alpc broker`
        # refuses to start meanwhile: the socket the successor holds is live.)
        rival.append(os.open(runtime_dir / "broker.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        fcntl.flock(rival[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return state

    monkeypatch.setattr(handover, "request_handover", racing)
    monkeypatch.setattr(alpc.broker, "LOCK_WAIT", 0.3)
    successor = alpc.Broker(runtime_dir, replace=True)
    try:
        with pytest.raises(alpc.BrokerRunning):
            successor.bind()
    finally:
        for fd in rival:
            os.close(fd)
    assert old.proc.wait(10) == 0
    third.append(_cli_broker(spawn, runtime_dir))  # the broker that serves the dir next
    assert len(taken) == 2  # the listener and the server's registration
    still_open = taken & _sockets_open()
    try:
        # Closing the handed-over sockets is what tells the server to register again.
        assert not still_open, f"the failed successor kept handed-over sockets open: {still_open}"
        with alpc.connect("svc.orphaned", config=config, timeout=5, retry_timeout=10) as comm:
            assert comm.request(b"back", timeout=5).data == b"BACK"
    finally:
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") in still_open:
                    os.close(int(fd))
            except OSError:
                pass
        third[0].proc.send_signal(signal.SIGTERM)
        assert third[0].proc.wait(10) == 0


class _FakePredecessor:
    """A broker that answers HANDOVER with hand-made state (a crashed or buggy one, same uid)."""

    def __init__(self, runtime_dir: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(runtime_dir / "broker.sock"))
        self.listener.listen(8)
        self.error: BaseException | None = None
        self.done = False

    def serve(self, peers: list[tuple[control.HandoverPeer, int]], ports: tuple[control.HandoverPort, ...]) -> None:
        try:
            conn, _ = self.listener.accept()
            stream = Stream(conn)
            try:
                limits = FrameLimits(allowed_types=frozenset({MessageType.HANDOVER, MessageType.HANDOVER_DONE}),
                                     max_data=1024)
                decoder = FrameDecoder(limits)
                frame, _ = read_frame(stream, decoder, None, "handover")
                assert frame is not None and frame.type is MessageType.HANDOVER
                body = control.HandoverState(listener=True, owns_socket_file=True, last=True,
                                             peers=tuple(p for p, _ in peers), ports=ports)
                fds = [self.listener.fileno()] + [fd for _, fd in peers]
                stream.send(control_frame(body, n_fds=len(fds)), fds=fds)
                frame, _ = read_frame(stream, decoder, None, "done")
                self.done = frame is not None and frame.type is MessageType.HANDOVER_DONE
            finally:
                stream.close()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.listener.close()


def _port(owner: int, name: str) -> control.HandoverPort:
    return control.HandoverPort(name=name, owner=owner, max_message_length=1 << 20, max_connect_data=1024,
                                max_pending_connects=16, connects_forwarded=0, quota_refusals=0,
                                connects_refused=0, status=b"")


@pytest.mark.timeout(30)
def test_junk_half_read_bytes_from_a_predecessor_cost_one_peer_not_the_broker(runtime_dir: Path,
                                                                                   config: alpc.Config) -> None:
    """A peer's ``inbound`` that is no frame prefix: drop that peer, serve the rest.

    The successor already confirmed (the predecessor is gone), so failing bind()
    here loses every registration and leaves the runtime dir without a broker.
    """
    good_broker_end, good_server_end = socket.socketpair()
    junk_broker_end, junk_server_end = socket.socketpair()
    fake = _FakePredecessor(runtime_dir)
    junk = b"\xff" * HEADER_SIZE  # a header no decoder accepts
    peers = [(control.HandoverPeer(id=0, role="server", inbound=b"", close_when_flushed=False),
              good_broker_end.fileno()),
             (control.HandoverPeer(id=1, role="new", inbound=junk, close_when_flushed=False),
              junk_broker_end.fileno())]
    thread = threading.Thread(target=fake.serve, args=(peers, (_port(0, "svc.good"),)), daemon=True)
    thread.start()
    successor = alpc.Broker(runtime_dir, replace=True)
    try:
        try:
            successor.start()
        finally:
            thread.join(10)
            fake.close()  # the successor holds its own copy of the listener
            good_broker_end.close()
            junk_broker_end.close()
        assert fake.error is None and fake.done
        assert [p.name for p in alpc.list_ports(config)] == ["svc.good"]
        # The junk peer was hung up on.
        junk_server_end.settimeout(5)
        assert junk_server_end.recv(1) == b""
    finally:
        successor.stop()
        good_server_end.close()
        junk_server_end.close()

"""The broker daemon: readiness, clean shutdown, single instance, and garbage on its socket."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import alpc
from alpc import control
from alpc.wire import FrameDecoder, FrameLimits, MessageType, encode_frame


def start_cli_broker(spawn, runtime_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    broker = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker", *extra])
    assert broker.expect("READY") == [str(runtime_dir / "broker.sock")]
    return broker


def test_ready_line_socket_permissions_and_sigterm_cleanup(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    broker = start_cli_broker(spawn, runtime_dir)
    sock = runtime_dir / "broker.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert sock.stat().st_mode & 0o077 == 0
    assert runtime_dir.stat().st_mode & 0o777 == 0o700
    with alpc.create_port("svc.told", config=config, reregister_timeout=0) as port:
        broker.proc.send_signal(signal.SIGTERM)
        assert broker.proc.wait(10) == 0
        with pytest.raises(alpc.BrokerUnavailable, match="shut down"):
            port.listen(timeout=5)
    assert not sock.exists()
    broker.expect_stderr("broker stopped")


def _frames_until_eof(sock: socket.socket, decoder: FrameDecoder) -> list[MessageType]:
    frames = []
    with sock:
        while data := sock.recv(65536):
            frames += [frame.type for frame in decoder.feed(data)]
    return frames


def test_clients_waiting_on_the_broker_are_told_at_shutdown(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    """SIGTERM: a client mid-request and connects still queued for a server get SHUTDOWN, not a bare EOF.

    Connects the broker already handed to the server are the server's to answer
    (here it never reads, so they end when it hangs up).
    """
    broker = start_cli_broker(spawn, runtime_dir)
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a server that registers, then never reads
    deaf.connect(str(config.broker_socket))
    deaf.sendall(encode_frame(MessageType.CREATE_PORT, control.encode_body(control.CreatePort(
        name="svc.deaf", max_message_length=1 << 20, max_connect_data=64 << 10, max_pending_connects=64))))
    assert deaf.recv(40)[3] == MessageType.PORT_CREATED
    halfway = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a client whose request is half sent
    halfway.connect(str(config.broker_socket))
    halfway.sendall(encode_frame(MessageType.CONNECT, b"x" * 100)[:50])
    # More connect data than the broker's socket to the deaf server buffers
    # (net.core.wmem_default): the rest wait in the broker's queue.
    count = int(Path("/proc/sys/net/core/wmem_default").read_text()) // 60_000 + 4
    assert count < 64, "more connects than max_pending_connects would take"
    outcomes: list[BaseException] = []

    def connect() -> None:
        try:
            alpc.connect("svc.deaf", b"c" * 60_000, config=config, timeout=20).close()
        except alpc.AlpcError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while alpc.port_stats("svc.deaf", config).ports[0].connects_forwarded < count:
        assert time.monotonic() < deadline
        threading.Event().wait(0.02)  # handshake-free: the broker's counter is the only signal
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(10) == 0
    told = FrameDecoder(FrameLimits(allowed_types=frozenset({MessageType.SHUTDOWN}), max_data=1024))
    assert _frames_until_eof(halfway, told) == [MessageType.SHUTDOWN]
    # Its full socket had no room for a notice: the deaf server just sees EOF after what it never read.
    deaf.close()  # the connects it was handed end with it
    for thread in threads:
        thread.join(20)
    assert len(outcomes) == count and not any(thread.is_alive() for thread in threads)
    shut_down = [exc for exc in outcomes if isinstance(exc, alpc.BrokerUnavailable) and "shutting down" in str(exc)]
    assert shut_down, [repr(exc) for exc in outcomes]
    assert len(shut_down) < count  # the first ones reached the server
    assert all(isinstance(exc, alpc.PeerGone | alpc.BrokerUnavailable) for exc in outcomes), outcomes


def test_sigint_shuts_down_too(spawn, runtime_dir: Path) -> None:
    broker = start_cli_broker(spawn, runtime_dir)
    broker.proc.send_signal(signal.SIGINT)
    assert broker.proc.wait(10) == 0
    assert not (runtime_dir / "broker.sock").exists()


def test_ready_fd(spawn, runtime_dir: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker", "--ready-fd", str(write_end)],
            pass_fds=[write_end], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as ready:
            read_end = -1
            assert ready.readline() == b"READY\n"
        assert (runtime_dir / "broker.sock").exists()
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def test_second_broker_is_refused(broker: alpc.Broker, runtime_dir: Path, spawn) -> None:
    with pytest.raises(alpc.BrokerRunning):
        alpc.Broker(runtime_dir).start()
    second = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker"])
    assert second.proc.wait(20) == 1
    second.expect_stderr("BrokerRunning")
    # The running broker was not disturbed.
    assert alpc.list_ports(alpc.Config.from_env(runtime_dir)) == ()


def test_stale_socket_of_a_killed_broker_is_replaced(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    first = start_cli_broker(spawn, runtime_dir)
    first.kill()
    assert (runtime_dir / "broker.sock").exists()
    with pytest.raises(alpc.BrokerUnavailable):
        alpc.list_ports(config)
    with alpc.Broker(runtime_dir):
        assert alpc.list_ports(config) == ()
    assert not (runtime_dir / "broker.sock").exists()


def test_no_broker_fails_fast(config: alpc.Config) -> None:
    started = time.monotonic()
    with pytest.raises(alpc.BrokerUnavailable):
        alpc.connect("svc.none", config=config, timeout=5)
    with pytest.raises(alpc.BrokerUnavailable):
        alpc.create_port("svc.none", config=config)
    assert time.monotonic() - started < 1.0


def test_in_process_broker_context_manager(runtime_dir: Path, config: alpc.Config) -> None:
    with alpc.Broker(runtime_dir) as broker:
        assert broker.socket_path.exists()
        assert alpc.list_ports(config) == ()
    assert not broker.socket_path.exists()


def test_established_channel_survives_broker_death(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    broker = start_cli_broker(spawn, runtime_dir)
    server = spawn("server", "svc.resilient")
    server.expect("READY")
    with alpc.connect("svc.resilient", config=config, timeout=5) as comm:
        broker.kill()
        assert comm.request(b"still here", timeout=5).data == b"STILL HERE"
        started = time.monotonic()
        with pytest.raises(alpc.BrokerUnavailable):
            alpc.connect("svc.resilient", config=config, timeout=5)
        assert time.monotonic() - started < 1.0
    (runtime_dir / "broker.sock").unlink()
    (runtime_dir / "broker.lock").unlink()


def test_a_request_written_right_behind_the_connect_reaches_the_server(broker: alpc.Broker,
                                                                       config: alpc.Config) -> None:
    """The broker reads exactly the CONNECT frame: what the client wrote after it, in the
    same send, travels with the socket to the server."""
    with alpc.create_port("svc.eager", config=config) as port:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        client.connect(str(config.broker_socket))
        hello = control.Connect(name="svc.eager", data=b"", max_message_length=1 << 16, max_section_bytes=0,
                                flow=control.FlowSpec())
        early = encode_frame(MessageType.REQUEST, b"early", message_id=1, sender_pid=os.getpid())
        client.sendall(encode_frame(MessageType.CONNECT, control.encode_body(hello)) + early)
        with port.listen(timeout=5).accept() as comm:
            request = comm.receive(timeout=5)
            assert (request.type, request.data) == (alpc.MessageType.REQUEST, b"early")
            request.reply(b"late")
            decoder = FrameDecoder(FrameLimits(allowed_types=frozenset({MessageType.CONNECTION_REPLY,
                                                                        MessageType.REPLY}),
                                               max_data=1 << 16, max_fds=1))
            frames = []
            while len(frames) < 2:
                chunk = client.recv(65536)
                assert chunk, "the server hung up"
                frames += decoder.feed(chunk)
            assert [frame.type for frame in frames] == [MessageType.CONNECTION_REPLY, MessageType.REPLY]
            assert (frames[1].callback_id, frames[1].data) == (1, b"late")
        client.close()

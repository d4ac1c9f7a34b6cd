"""Broker restarts lose nothing: channels survive, servers re-register, clients retry, handover is seamless."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

import alpc
from alpc import control, handover
from alpc.exchange import control_frame
from alpc.transport import Stream
from alpc.wire import HEADER_SIZE, MessageType, encode_frame

OPS = Path(__file__).resolve().parent / "ops_peers.py"


def cli_broker(spawn, runtime_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    broker = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker", *extra])
    assert broker.expect("READY") == [str(runtime_dir / "broker.sock")]
    return broker


def ops(spawn, role: str, name: str, runtime_dir: Path, *args: str):  # type: ignore[no-untyped-def]
    return spawn.argv([sys.executable, str(OPS), role, name, "--runtime-dir", str(runtime_dir), *args])


def stop(broker) -> None:  # type: ignore[no-untyped-def]
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(10) == 0


def forget_killed_broker(runtime_dir: Path) -> None:
    """A SIGKILLed broker leaves its socket and lock behind (the next broker replaces them)."""
    (runtime_dir / "broker.sock").unlink(missing_ok=True)
    (runtime_dir / "broker.lock").unlink(missing_ok=True)


def test_sigkill_channels_work_connects_fail_fast_and_the_server_comes_back(spawn, runtime_dir: Path,
                                                                             config: alpc.Config) -> None:
    broker = cli_broker(spawn, runtime_dir)
    server = ops(spawn, "server", "svc.phoenix", runtime_dir)
    server.expect("READY")
    with alpc.connect("svc.phoenix", config=config, timeout=5) as comm:
        assert server.expect("ACCEPTED") == [str(os.getpid()), "1"]
        broker.kill()
        # Established channels do not involve the broker.
        assert comm.request(b"still here", timeout=5).data == b"STILL HERE"
        started = time.monotonic()
        with pytest.raises(alpc.BrokerUnavailable):
            alpc.connect("svc.phoenix", config=config, timeout=5)
        assert time.monotonic() - started < 1.0
        second_broker = cli_broker(spawn, runtime_dir)
        # The server registers again by itself; a retrying client rides out the gap.
        with alpc.connect("svc.phoenix", config=config, timeout=5, retry_timeout=15) as second:
            assert second.request(b"new", timeout=5).data == b"NEW"
        assert server.expect("ACCEPTED") == [str(os.getpid()), "2"]  # the same wait() loop, registration 2
        assert comm.request(b"old", timeout=5).data == b"OLD"
    server.expect_stderr("lost its registration (the broker went away)")
    stop(second_broker)


def test_reregistration_after_a_graceful_broker_restart(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    broker = cli_broker(spawn, runtime_dir)
    with alpc.create_port("svc.patient", config=config, reregister_timeout=20) as port:
        broker.proc.send_signal(signal.SIGTERM)
        assert broker.proc.wait(10) == 0
        assert not port.registered or port.registrations == 1
        second_broker = cli_broker(spawn, runtime_dir)
        connector = ops(spawn, "connector", "svc.patient", runtime_dir, "--retry-timeout", "15")
        connector.expect("READY")
        connector.send("go")
        request = port.listen(timeout=15)  # listen() kept working across the gap
        assert port.registered and port.registrations == 2
        comm = request.accept()
        message = comm.receive(timeout=10)
        comm.reply(message, message.data.upper())
        assert connector.expect("DONE") == ["ok=1", "failed=0"]
        comm.close()
    stop(second_broker)


def test_reregistration_gives_up_after_its_timeout(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    broker = cli_broker(spawn, runtime_dir)
    server = ops(spawn, "server", "svc.orphan", runtime_dir, "--reregister-timeout", "0.3")
    server.expect("READY")
    with alpc.connect("svc.orphan", config=config, timeout=5) as comm:
        server.expect("ACCEPTED")
        started = time.monotonic()
        broker.kill()
        # wait() raises once, then goes on serving the established connection.
        assert server.expect("LOST")[0] == "BrokerUnavailable"
        assert time.monotonic() - started < 5
        assert comm.request(b"served", timeout=5).data == b"SERVED"
    server.expect_stderr("did not come back within 0.3s")
    forget_killed_broker(runtime_dir)


def test_listen_raises_once_the_registration_is_given_up(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    broker = cli_broker(spawn, runtime_dir)
    with alpc.create_port("svc.quiet", config=config, reregister_timeout=0.2) as port:
        broker.kill()
        started = time.monotonic()
        with pytest.raises(alpc.BrokerUnavailable, match="did not come back"):
            port.listen(timeout=10)
        assert time.monotonic() - started < 5
        assert not port.registered
        with pytest.raises(alpc.BrokerUnavailable):
            port.listen(timeout=10)
    forget_killed_broker(runtime_dir)


def test_a_name_taken_during_the_gap_is_reported_as_name_in_use(spawn, runtime_dir: Path,
                                                                 config: alpc.Config) -> None:
    broker = cli_broker(spawn, runtime_dir)
    server = ops(spawn, "server", "svc.contested", runtime_dir)
    server.expect("READY")
    # Freeze the server so that it cannot register again before the usurper.
    server.proc.send_signal(signal.SIGSTOP)
    try:
        broker.kill()
        second_broker = cli_broker(spawn, runtime_dir)
        with alpc.create_port("svc.contested", config=config) as usurper:
            server.proc.send_signal(signal.SIGCONT)
            lost = server.expect("LOST")
            assert lost[0] == "NameInUse" and "taken_while_the_broker_was_away" in lost[1]
            # The usurper keeps the name.
            assert [(p.name, p.pid) for p in alpc.list_ports(config)] == [("svc.contested", os.getpid())]
            assert usurper.registered
    finally:
        server.proc.send_signal(signal.SIGCONT)
    stop(second_broker)


def test_connect_retry(broker: alpc.Broker, config: alpc.Config, spawn, runtime_dir: Path) -> None:
    started = time.monotonic()
    with pytest.raises(alpc.PortNotFound):
        alpc.connect("svc.later", config=config, timeout=5)
    with pytest.raises(alpc.PortNotFound):
        alpc.connect("svc.later", config=config, timeout=5, retry_timeout=0.3)
    assert time.monotonic() - started < 3
    connector = ops(spawn, "connector", "svc.later", runtime_dir, "--retry-timeout", "15")
    connector.expect("READY")
    connector.send("go")
    connector.expect("CONNECTING")
    server = ops(spawn, "server", "svc.later", runtime_dir)
    server.expect("READY")
    assert connector.expect("DONE") == ["ok=1", "failed=0"]


def test_connect_retry_rides_out_a_missing_broker(spawn, runtime_dir: Path) -> None:
    connector = ops(spawn, "connector", "svc.early", runtime_dir, "--retry-timeout", "20")
    connector.expect("READY")
    connector.send("go")
    connector.expect("CONNECTING")
    broker = cli_broker(spawn, runtime_dir)
    ops(spawn, "server", "svc.early", runtime_dir).expect("READY")
    assert connector.expect("DONE") == ["ok=1", "failed=0"]
    stop(broker)


# -- graceful handover -------------------------------------------------------------------


def test_replace_hands_everything_over(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    old = cli_broker(spawn, runtime_dir)
    server = ops(spawn, "server", "svc.seamless", runtime_dir)
    server.expect("READY")
    with alpc.connect("svc.seamless", config=config, timeout=5) as comm:
        server.expect("ACCEPTED")
        connector = ops(spawn, "connector", "svc.seamless", runtime_dir, "--count", "20")
        connector.expect("READY")
        # Freeze the old broker: the successor's request and twenty connects queue up behind it.
        old.proc.send_signal(signal.SIGSTOP)
        new = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker", "--replace"])
        connector.send("go")
        connector.expect("CONNECTING")
        old.proc.send_signal(signal.SIGCONT)
        assert new.expect("READY") == [str(runtime_dir / "broker.sock")]
        assert old.proc.wait(10) == 0
        old.expect_stderr(f"handed over to pid {new.pid}")
        # No connect failed (retry was off), and none went through a re-registration.
        assert connector.expect("DONE") == ["ok=20", "failed=0"]
        assert comm.request(b"same channel", timeout=5).data == b"SAME CHANNEL"
        listed = alpc.list_ports(config)
        assert [(p.name, p.pid) for p in listed] == [("svc.seamless", server.pid)]
        with alpc.connect("svc.seamless", config=config, timeout=5) as later:
            assert later.request(b"x", timeout=5).data == b"X"
            assert server.expect("ACCEPTED")[1] == "1"
    assert "lost its registration" not in server.stderr()
    new.expect_stderr("took over 1 ports")
    new.proc.send_signal(signal.SIGTERM)
    assert new.proc.wait(10) == 0
    assert not (runtime_dir / "broker.sock").exists()


def test_replace_without_a_running_broker_starts_fresh(spawn, runtime_dir: Path) -> None:
    broker = cli_broker(spawn, runtime_dir, "--replace")
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(10) == 0
    broker.expect_stderr("no broker was running")


def test_a_failed_handover_leaves_the_old_broker_serving(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.steady")
    server.expect("READY")
    with alpc.connect("svc.steady", config=config, timeout=5) as comm:
        # A would-be successor takes the state, then hangs up instead of confirming.
        stream = Stream.connect(config.broker_socket, 5)
        try:
            stream.send(control_frame(control.Handover(pid=os.getpid())))
            state = handover.receive_state(stream, time.monotonic() + 10)
            assert [p.name for p in state.ports] == ["svc.steady"]
            assert state.listener.path == config.broker_socket
            state.close()
        finally:
            stream.close()
        # Nobody noticed: the broker still serves the port and the channel.
        assert [p.name for p in alpc.list_ports(config)] == ["svc.steady"]
        assert comm.request(b"ok", timeout=5).data == b"OK"
        with alpc.connect("svc.steady", config=config, timeout=5) as second:
            assert second.request(b"two", timeout=5).data == b"TWO"


def _connect_frame(name: str, data: bytes) -> bytes:
    body = control.encode_body(control.Connect(name=name, data=data, max_message_length=1 << 20,
                                                max_section_bytes=1 << 20))
    return encode_frame(MessageType.CONNECT, body)


def test_handover_moves_half_read_and_unsent_bytes(broker: alpc.Broker, config: alpc.Config) -> None:
    """A connect frame half sent, and connects queued for a server whose socket buffer is full."""
    attributes = alpc.PortAttributes(max_pending_connects=1000)
    with alpc.create_port("svc.busy", attributes, config=config, reregister_timeout=0) as port:
        clients = []
        try:
            slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(slow)
            slow.connect(str(config.broker_socket))
            half = _connect_frame("svc.busy", b"half")
            slow.sendall(half[:HEADER_SIZE + 3])
            # 16 x 60 KiB is more than a Unix socket buffers: the broker queues the rest.
            sent = {b"half"}
            for number in range(16):
                data = b"%02d" % number + b"." * 60_000
                sent.add(data)
                queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(queued)
                queued.connect(str(config.broker_socket))
                queued.sendall(_connect_frame("svc.busy", data))
            with alpc.Broker(config.runtime_dir, replace=True) as successor:
                assert broker.handed_over_to == os.getpid()
                slow.sendall(half[HEADER_SIZE + 3:])  # the rest goes to the successor
                got = set()
                for _ in range(len(sent)):
                    request = port.listen(timeout=10)
                    got.add(request.data)
                    request.reject("thanks")
                assert got == sent
                assert port.registered and port.registrations == 1
                assert [p.name for p in alpc.list_ports(config)] == ["svc.busy"]
                assert alpc.port_stats("svc.busy", config).ports[0].connects_forwarded == len(sent)
                assert successor.socket_path == config.broker_socket
        finally:
            for client in clients:
                client.close()


def test_a_garbled_registration_is_replaced(broker: alpc.Broker, config: alpc.Config, spawn,
                                            runtime_dir: Path) -> None:
    """The port hangs up on a broker that sent garbage and registers again (the broker may still hold the name)."""
    with alpc.create_port("svc.garbled", config=config, report_interval=0.05) as port:
        owner = broker._ports["svc.garbled"].owner  # white-box: make the broker's end misbehave
        owner.stream.try_send([b"\xde\xad" * 30])
        with pytest.raises(alpc.Timeout):
            port.listen(timeout=0.2)  # reads the garbage; the keeper registers again
        connector = ops(spawn, "connector", "svc.garbled", runtime_dir, "--retry-timeout", "10")
        connector.expect("READY")
        connector.send("go")
        comm = port.listen(timeout=10).accept()
        message = comm.receive(timeout=10)
        comm.reply(message, message.data.upper())
        assert connector.expect("DONE") == ["ok=1", "failed=0"]
        assert port.registered and port.registrations == 2
        comm.close()

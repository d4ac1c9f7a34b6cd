"""systemd integration without systemd: socket activation, readiness notification, unit files.

The tests play the service manager: they create the listening socket, pass it
as fd 3 with LISTEN_FDS/LISTEN_PID set for the broker's own pid (a wrapper
sets LISTEN_PID to itself, then execs the broker), and read the datagrams the
broker sends to a NOTIFY_SOCKET they bound.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import alpc
from alpc import daemon, transport

ROOT = Path(__file__).resolve().parent.parent
OPS = Path(__file__).resolve().parent / "ops_peers.py"
BROKER = [sys.executable, "-m", "alpc", "--log-level", "DEBUG"]


@pytest.fixture
def notify_socket(runtime_dir: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = runtime_dir.parent / f"{runtime_dir.name}.notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    yield sock, path
    sock.close()
    path.unlink()


def listening_socket(path: Path, kind: int = socket.SOCK_STREAM, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if listen:
        sock.listen(16)
    return sock


def activated(spawn, runtime_dir: Path, sock: socket.socket, notify: Path | None, *broker_args: str):  # type: ignore[no-untyped-def]
    env = {**os.environ}
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    argv = [sys.executable, str(OPS), "activate", str(sock.fileno()), "--",
            *BROKER, "--runtime-dir", str(runtime_dir), "broker", *broker_args]
    return spawn.argv(argv, env, (sock.fileno(),))


def notices(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_socket_activation_and_readiness(spawn, runtime_dir: Path, config: alpc.Config, notify_socket) -> None:
    notify, notify_path = notify_socket
    path = runtime_dir / "broker.sock"
    listener = listening_socket(path)
    try:
        broker = activated(spawn, runtime_dir, listener, notify_path)
        # The pass_fds copy lives in the child only; inheriting it is what activation means.
        assert broker.expect("READY") == [str(path)]
        ready = notices(notify)
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(broker.pid)  # the wrapper exec'ed the broker in place
        assert ready["STATUS"].startswith(f"serving {path}")
        # It serves on the socket it was given.
        with alpc.create_port("svc.activated", config=config) as port:
            client = spawn("client", "svc.activated")
            port.listen(timeout=10).accept().close()
            client.expect("READY")
        broker.proc.send_signal(signal.SIGTERM)
        stopping = notices(notify)
        while "STOPPING" not in stopping:  # STATUS= updates may come first
            stopping = notices(notify)
        assert stopping["STOPPING"] == "1"
        assert broker.proc.wait(10) == 0
        broker.expect_stderr("socket-activated on fd 3")
        # The activator owns the socket file: the broker leaves it in place.
        assert path.exists()
        assert not (runtime_dir / "broker.lock").exists()
    finally:
        listener.close()
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(("kind", "listen", "why"), [
    (socket.SOCK_DGRAM, False, "not a Unix stream socket"),
    (socket.SOCK_SEQPACKET, True, "not a Unix stream socket"),
    (socket.SOCK_STREAM, False, "not listening"),
])
def test_activation_with_the_wrong_socket_fails_cleanly(spawn, runtime_dir: Path, kind: int, listen: bool,
                                                        why: str) -> None:
    path = runtime_dir / "broker.sock"
    sock = listening_socket(path, kind, listen)
    try:
        broker = activated(spawn, runtime_dir, sock, None)
        assert broker.proc.wait(20) == 1
        assert why in broker.expect_stderr("ActivationError")
        assert not (runtime_dir / "broker.lock").exists()
    finally:
        sock.close()
        path.unlink()


def test_activation_meant_for_another_pid_is_ignored(spawn, runtime_dir: Path) -> None:
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1"}
    broker = spawn.argv([*BROKER, "--runtime-dir", str(runtime_dir), "broker"], env)
    assert broker.expect("READY") == [str(runtime_dir / "broker.sock")]  # bound its own socket
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(10) == 0
    assert not (runtime_dir / "broker.sock").exists()


def test_activation_environment_parsing() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    # Another pid's variables: ignored, and removed so no child inherits them.
    assert daemon.activation_fds(env, pid=41) == []
    assert env == {}
    assert daemon.activation_fds({}, pid=42) == []
    with pytest.raises(alpc.ActivationError, match="not a count"):
        daemon.activation_fds({"LISTEN_PID": "42", "LISTEN_FDS": "many"}, pid=42)
    with pytest.raises(alpc.ActivationError, match="the broker serves one socket, but 2"):
        daemon.activation_listen_fd({"LISTEN_PID": "7", "LISTEN_FDS": "2"}, pid=7)
    assert daemon.activation_listen_fd({"LISTEN_PID": "7", "LISTEN_FDS": "0"}, pid=7) is None


def test_notify_reaches_abstract_and_path_sockets(tmp_path: Path) -> None:
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"alpc-test-notify-{os.getpid()}"
    abstract.bind("\0" + name)
    abstract.settimeout(5)
    try:
        assert transport.notify_service_manager("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert abstract.recv(100) == b"READY=1"
    finally:
        abstract.close()
    assert not transport.notify_service_manager("READY=1", {})
    assert not transport.notify_service_manager("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    notifier = daemon.ServiceNotifier({})
    assert not notifier.enabled and not notifier.ready("x")


def test_status_updates_are_not_repeated(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        notifier = daemon.ServiceNotifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.ready("1 ports")
        assert not notifier.status("1 ports")
        assert notifier.status("2 ports")
        assert notifier.stopping()
        got = [sock.recv(200).decode() for _ in range(3)]
        assert got[0].startswith("READY=1\nSTATUS=1 ports\nMAINPID=")
        assert got[1:] == ["STATUS=2 ports", "STOPPING=1\nSTATUS=stopping"]
    finally:
        sock.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_real_socket_activator(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    path = runtime_dir / "broker.sock"
    command = " ".join(["exec systemd-socket-activate -l", str(path), *BROKER, "--runtime-dir", str(runtime_dir),
                        "broker 2>&1"])
    broker = spawn.argv(["sh", "-c", command])
    broker.expect("Listening on")
    # systemd-socket-activate execs the broker in place on the first connection.
    with alpc.create_port("svc.real", config=config):
        broker.expect("READY")
        assert [p.name for p in alpc.list_ports(config)] == ["svc.real"]
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(10) == 0
    path.unlink()


UNITS = ROOT / "contrib" / "systemd"


@pytest.mark.parametrize("instance", ["user", "system"])
def test_unit_files(instance: str, tmp_path: Path) -> None:
    socket_unit = (UNITS / instance / "alpc-broker.socket").read_text()
    service_unit = (UNITS / instance / "alpc-broker.service").read_text()
    runtime = "%t/alpc" if instance == "user" else "/run/alpc"
    assert f"ListenStream={runtime}/broker.sock" in socket_unit
    if instance == "user":  # private: only the user reaches it
        assert "SocketMode=0600" in socket_unit and "DirectoryMode=0700" in socket_unit
        assert f"ExecStart=alpc --runtime-dir {runtime} broker\n" in service_unit
    else:  # shared: everyone reaches it, each port's ACL keeps them out
        assert "SocketMode=0666" in socket_unit and "DirectoryMode=0755" in socket_unit
        assert f"ExecStart=alpc --runtime-dir {runtime} broker --shared\n" in service_unit
    assert "Type=notify" in service_unit
    if shutil.which("systemd-analyze") is None:
        return
    # Verify a copy whose ExecStart names this checkout's alpc (systemd checks the binary exists).
    for name in ("alpc-broker.socket", "alpc-broker.service"):
        text = (UNITS / instance / name).read_text()
        (tmp_path / name).write_text(text.replace("ExecStart=alpc ", f"ExecStart={Path(sys.executable).parent}/alpc "))
    argv = ["systemd-analyze", *(["--user"] if instance == "user" else []), "verify",
            str(tmp_path / "alpc-broker.socket"), str(tmp_path / "alpc-broker.service")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)})
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_a_successor_leaves_the_activators_socket_file_alone(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    path = runtime_dir / "broker.sock"
    listener = listening_socket(path)
    try:
        old = activated(spawn, runtime_dir, listener, None)
        old.expect("READY")
        with alpc.create_port("svc.moved", config=config):
            new = spawn.argv([*BROKER, "--runtime-dir", str(runtime_dir), "broker", "--replace"])
            assert new.expect("READY") == [str(path)]
            assert old.proc.wait(10) == 0
            assert [p.name for p in alpc.list_ports(config)] == ["svc.moved"]
        new.proc.send_signal(signal.SIGTERM)
        assert new.proc.wait(10) == 0
        assert path.exists()  # still the activator's
    finally:
        listener.close()
        path.unlink(missing_ok=True)

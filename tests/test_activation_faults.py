"""Socket activation with malformed variables: a typed ActivationError, never a traceback or an ignored socket."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

PEERS = Path(__file__).resolve().parent / "activation_peers.py"
BROKER = [sys.executable, "-m", "alpc", "--log-level", "DEBUG"]


def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def activated(spawn, runtime_dir: Path, sock: socket.socket, pid_text: str, count_text: str):  # type: ignore[no-untyped-def]
    argv = [sys.executable, str(PEERS), "activate", str(sock.fileno()), pid_text, count_text, "--",
            *BROKER, "--runtime-dir", str(runtime_dir), "broker"]
    return spawn.argv(argv, {**os.environ}, (sock.fileno(),))


def stop(broker) -> None:  # type: ignore[no-untyped-def]
    """On the unfixed code the broker serves a socket of its own: SIGTERM removes it (SIGKILL would not)."""
    if broker is not None and broker.proc.poll() is None:
        broker.proc.terminate()
        broker.proc.wait(10)


@pytest.mark.parametrize(("pid_text", "count_text"), [
    ("$$", "\u00b2"),    # LISTEN_FDS: str.isdigit() accepts a superscript two, int() does not
    ("\u00b2", "1"),     # LISTEN_PID: the same
])
def test_non_ascii_digits_are_an_activation_error(spawn, runtime_dir: Path, pid_text: str, count_text: str) -> None:
    path = runtime_dir / "activated.sock"
    sock = listening_socket(path)
    try:
        broker = None
        broker = activated(spawn, runtime_dir, sock, pid_text, count_text)
        with pytest.raises(AssertionError, match="exited before"):
            broker.expect("READY")
        assert broker.proc.wait(20) == 1
        stderr = broker.expect_stderr("ActivationError")
        assert "Traceback" not in stderr, stderr
        assert not (runtime_dir / "broker.sock").exists()  # it did not serve a socket of its own instead
    finally:
        stop(broker)
        sock.close()
        path.unlink()


@pytest.mark.parametrize("pid_text", ["abc", "-1", " 12", "0x10"])
def test_a_malformed_listen_pid_does_not_silently_drop_the_passed_socket(spawn, runtime_dir: Path,
                                                                          pid_text: str) -> None:
    # sd_listen_fds(3) fails (-EINVAL) on a LISTEN_PID it cannot parse; a broker that binds its
    # own socket instead leaves the activator's socket (and every client queued on it) unserved.
    path = runtime_dir / "activated.sock"
    sock = listening_socket(path)
    try:
        broker = None
        broker = activated(spawn, runtime_dir, sock, pid_text, "1")
        with pytest.raises(AssertionError, match="exited before"):
            broker.expect("READY")  # serving a socket of its own instead
        assert broker.proc.wait(20) == 1
        assert "LISTEN_PID" in broker.expect_stderr("ActivationError")
        assert not (runtime_dir / "broker.sock").exists()
    finally:
        stop(broker)
        sock.close()
        path.unlink()

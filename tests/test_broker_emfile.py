"""The broker out of fds (its hard RLIMIT_NOFILE reached): while it cannot accept, its loop
must not spin on the listener, which stays readable with the connections it cannot take
(100% CPU for as long as the shortage lasts); once fds free up it accepts them again.

The broker runs as its own uid (other processes' fds in flight do not count against it) with
soft = hard, so that it cannot raise its limit (tests run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import alpc

SEC_PEERS = Path(__file__).resolve().parent / "security_peers.py"
BROKER_UID = 54323
LIMIT = 32
# More connections than the broker has fds left: the last ones wait in its listen backlog.
CONNECTIONS = 40
# How long the broker's CPU time is watched while it is out of fds.
WATCH = 1.0
# A broker that waits uses next to nothing; one that spins uses most of a CPU.
MAX_CPU = 0.15

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the broker as another uid"),
]


@pytest.fixture
def broker_home() -> Iterator[Path]:
    """A runtime dir of BROKER_UID, in a directory only root may write to."""
    parent = Path(tempfile.mkdtemp(prefix="alpc-emfile-"))
    os.chmod(parent, 0o755)
    home = parent / "alpc"
    home.mkdir(mode=0o700)
    os.chown(home, BROKER_UID, BROKER_UID)
    try:
        yield home
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def test_a_broker_out_of_fds_does_not_spin_and_accepts_again(broker_home: Path, spawn) -> None:  # type: ignore[no-untyped-def]
    broker = spawn.argv([sys.executable, str(SEC_PEERS), "broker", str(broker_home), str(BROKER_UID),
                         f"{LIMIT}:{LIMIT}"])
    broker.expect("READY")
    config = alpc.Config.from_env(broker_home)
    proc = psutil.Process(broker.pid)
    held: list[socket.socket] = []
    try:
        for _ in range(CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(sock)
            sock.connect(str(config.broker_socket))
        # The broker takes what it can on its own time: wait (bounded) until its fds are all used.
        give_up = time.monotonic() + 20
        while proc.num_fds() < LIMIT:
            assert time.monotonic() < give_up, proc.num_fds()
            threading.Event().wait(0.01)  # handshake-free: polls the broker's fd table, bounded
        before = _cpu(proc)
        threading.Event().wait(WATCH)  # handshake-free: the measured interval, not a synchronisation
        used = _cpu(proc) - before
        print(f"broker CPU while out of fds: {used:.3f}s")
        assert used < MAX_CPU, f"the broker used {used:.2f}s of CPU in {WATCH}s while out of fds"
        for sock in held:
            sock.close()
        held.clear()
        # Its fds back, it serves again (the backlog's connections, then this one).
        assert not alpc.list_ports(config, timeout=10)
    finally:
        for sock in held:
            sock.close()
        broker.proc.stdin.close()  # the broker stops (and removes its socket) when stdin closes
        assert broker.expect("") == ["BYE"]

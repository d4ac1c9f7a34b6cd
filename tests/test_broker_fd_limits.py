"""The broker's fds: its per-uid connection quota against the process's own fd limit, and
the client sockets it passes to servers (the tests run as root; peers drop to other uids).

``max_connections_per_uid`` (1024 by default) is what keeps one user from using up the
broker's fds, so that user alone is refused. That only holds if the broker may open more
fds than one uid's quota: a service manager starts it with a soft RLIMIT_NOFILE of 1024
(systemd's default, hard 524288). The broker runs here with a soft limit of 64 and a quota
of 1024: one uid holding 100 connections must not lock every other user out.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import alpc
from alpc import control
from alpc.exchange import control_frame, read_frame
from alpc.quotas import Limit
from alpc.transport import Stream, deadline_after
from alpc.wire import FrameDecoder, FrameLimits, MessageType

HOSTILE_PEERS = Path(__file__).resolve().parent / "hostile" / "hostile_peers.py"
SEC_PEERS = Path(__file__).resolve().parent / "security_peers.py"
# The kernel counts fds in flight, and connections, per uid: each uid here is this suite's own.
# Not 65534 (other test runs on this machine use it), and not the same in the native and the
# pure-Python suites, which `make test` runs side by side (one's broker filled the other's count).
_UID_BASE = 54321 + (100 if os.environ.get("ALPC_PUREPYTHON", "") not in ("", "0") else 0)
HOG_UID = _UID_BASE

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the hog as another uid"),
]


def test_one_uid_within_its_quota_cannot_use_up_the_brokers_fds(runtime_dir: Path, config: alpc.Config,  # type: ignore[no-untyped-def]
                                                                spawn) -> None:
    broker = spawn.argv([sys.executable, str(SEC_PEERS), "broker", str(runtime_dir), "0", "64"])
    broker.expect("READY")
    try:
        hog = spawn.argv([sys.executable, str(HOSTILE_PEERS), "hog", "-", "--runtime-dir", str(runtime_dir),
                          "--as-user", str(HOG_UID), "--count", "100", "--timeout", "5"])
        assert hog.expect("HELD") == ["100"]
        # Everyone else is still served.
        with alpc.create_port("svc.after", config=config, timeout=5):
            usage = {u.uid: u.connections for u in alpc.port_stats("", config).broker.usage}
            assert usage[HOG_UID] == 100
        hog.send("release")
        hog.expect("RELEASED")
    finally:
        broker.proc.stdin.close()  # the broker stops (and removes its socket) when stdin closes
        assert broker.expect("") == ["BYE"]


# The uid of a broker that may not raise its fd limit (soft = hard); its own, so that no other
# process's fds in flight count against it (the kernel counts them per uid).
BROKER_UID = _UID_BASE + 1
HOARDED = 80
_LIMITS = FrameLimits(allowed_types=frozenset({MessageType.PORT_CREATED, MessageType.ERROR}),
                      max_data=control.MAX_CONTROL_BODY)


@pytest.fixture
def home_of() -> Iterator[Callable[[int], Path]]:
    """Runtime dirs of a given uid, each in a directory only root may write to."""
    parents: list[Path] = []

    def make(uid: int) -> Path:
        parent = Path(tempfile.mkdtemp(prefix="alpc-broker-home-"))
        parents.append(parent)
        os.chmod(parent, 0o755)
        home = parent / "alpc"
        home.mkdir(mode=0o700)
        os.chown(home, uid, uid)
        return home

    try:
        yield make
    finally:
        for parent in parents:
            shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def broker_home(home_of: Callable[[int], Path]) -> Path:
    """A runtime dir of BROKER_UID."""
    return home_of(BROKER_UID)


def _raw_server(config: alpc.Config, name: str) -> socket.socket:
    """A server that registers ``name`` and then never reads what the broker sends it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(config.broker_socket))
    sock.sendall(b"".join(control_frame(control.CreatePort(
        name=name, max_message_length=1 << 20, max_connect_data=1024, max_pending_connects=1000,
        acl=control.AclSpec(allow_everyone=True)))))
    stream = Stream.from_fd(os.dup(sock.fileno()))
    try:
        frame, _ = read_frame(stream, FrameDecoder(_LIMITS), deadline_after(10), "the port")
    finally:
        stream.close()
    assert frame is not None and frame.type is MessageType.PORT_CREATED
    return sock


def _raw_connect(config: alpc.Config, name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(config.broker_socket))
    sock.sendall(b"".join(control_frame(control.Connect(name=name, data=b"", max_message_length=1 << 20,
                                                        max_section_bytes=1 << 20))))
    return sock


def test_a_server_that_never_reads_cannot_take_another_port_down(broker_home: Path, spawn) -> None:  # type: ignore[no-untyped-def]
    """Past its fd limit the kernel refuses to pass one more socket: that connect is refused, and
    the port whose client it was keeps its name (no-one else can take it meanwhile)."""
    broker = spawn.argv([sys.executable, str(SEC_PEERS), "broker", str(broker_home), str(BROKER_UID), "64:64"])
    broker.expect("READY")
    config = alpc.Config.from_env(broker_home)
    held: list[socket.socket] = []
    try:
        with alpc.create_port("svc.legit", alpc.PortAttributes(acl=alpc.PortAcl(allow_everyone=True)),
                              config=config, timeout=5) as legit:
            hoarder = _raw_server(config, "svc.hoard")
            held = [hoarder] + [_raw_connect(config, "svc.hoard") for _ in range(HOARDED)]
            # The broker deals with the connects on its own time: poll its books (bounded) until it
            # took every one (passed on or refused), or dropped the port.
            give_up = time.monotonic() + 20
            while time.monotonic() < give_up:
                try:
                    if alpc.port_stats("svc.hoard", config).ports[0].connects_forwarded == HOARDED:
                        break
                except alpc.PortNotFound:
                    break
            # The broker's uid has more client sockets in flight than it may: this connect is refused ...
            with pytest.raises(alpc.QuotaExceeded) as refused:
                alpc.connect("svc.legit", config=config, timeout=5).close()
            assert refused.value.limit == Limit.MAX_PENDING_CONNECTS
            # ... but the port stays registered, its registration untouched.
            assert [port.name for port in alpc.list_ports(config)] == ["svc.hoard", "svc.legit"]
            assert legit.registered and legit.registrations == 1
            # The hoarder leaves: its sockets are no longer in flight, and the port serves again.
            hoarder.close()
            accepted: list[alpc.CommunicationPort] = []
            listener = threading.Thread(target=lambda: accepted.append(legit.listen(timeout=10).accept()))
            listener.start()
            with alpc.connect("svc.legit", config=config, timeout=10):
                listener.join(10)
            accepted[0].close()
    finally:
        for sock in held:
            sock.close()
        broker.proc.stdin.close()
        assert broker.expect("") == ["BYE"]


# -- the broker out of fds ----------------------------------------------------------------
# Its hard RLIMIT_NOFILE reached: while it cannot accept, its loop
# must not spin on the listener, which stays readable with the connections it cannot take
# (100% CPU for as long as the shortage lasts); once fds free up it accepts them again.
# The broker runs as its own uid (other processes' fds in flight do not count against it) with
# soft = hard, so that it cannot raise its limit (tests run as root).

EMFILE_UID = _UID_BASE + 2
LIMIT = 32
# More connections than the broker has fds left: the last ones wait in its listen backlog.
CONNECTIONS = 40
# How long the broker's CPU time is watched while it is out of fds.
WATCH = 1.0
# A broker that waits uses next to nothing; one that spins uses most of a CPU.
MAX_CPU = 0.15


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def test_a_broker_out_of_fds_does_not_spin_and_accepts_again(home_of, spawn) -> None:  # type: ignore[no-untyped-def]
    broker_home = home_of(EMFILE_UID)
    broker = spawn.argv([sys.executable, str(SEC_PEERS), "broker", str(broker_home), str(EMFILE_UID),
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

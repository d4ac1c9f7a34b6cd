"""Section pool and request edge cases: a trim whose write times out, a dropped PendingRequest
whose reply brought fds (real server processes from tests/pool_fault_peers.py)."""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import sys
from pathlib import Path

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "pool_fault_peers.py"
MIB = 1 << 20

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def peer(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(role: str, name: str, *args: str):  # type: ignore[no-untyped-def]
        server = spawn.argv([sys.executable, str(PEERS), role, name, "--runtime-dir", str(runtime_dir), *args])
        server.expect("READY")
        return server
    return start


def _fill_socket(comm: alpc.CommunicationPort) -> None:
    """Small datagrams until one cannot be written at all (the peer reads nothing now)."""
    comm._stream._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[attr-defined]
    with pytest.raises(alpc.Timeout) as filled:
        for _ in range(20000):
            comm.send(b"x" * 200, timeout=0.2)
    assert not isinstance(filled.value, alpc.Throttled), "the datagram window closed before the socket filled"


def test_a_trim_whose_write_timed_out_still_reaches_the_peer(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """trim_sections() unmaps the idle sections here at once; their SECTION_CLOSE must reach the
    peer even when the write timed out with nothing sent (the peer was not reading then).
    Otherwise the peer keeps mapping them for the connection's life: no later trim names them
    again, as they are gone from this side's pool."""
    server = peer("trim", "pool.trim")
    with alpc.connect("pool.trim", config=config, timeout=10) as comm:
        # Over the rings' 1 MiB bulk area: a pooled section, mapped there.
        assert comm.request(os.urandom(MIB + 4096), timeout=10).data == b"ok"
        assert comm.request(b"count", timeout=10).data == b"1"
        pool = comm._channel.sections.pool  # type: ignore[attr-defined]
        assert pool.ledger.lent_bytes() == 0  # idle: the server released its range
        assert comm.request(b"hold", timeout=10).data == b"held"
        server.expect("HOLDING")
        _fill_socket(comm)
        with pytest.raises(alpc.Timeout):
            comm.trim_sections(timeout=0.2)
        assert not comm.closed  # nothing of it was written
        assert pool.ledger.section_ids == []  # unmapped here already
        server.send("go")  # the server reads again
        assert comm.request(b"count", timeout=10).data == b"0", "the server still maps the trimmed section"


def test_a_dropped_pending_request_closes_the_fds_its_reply_brought(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """A PendingRequest dropped after its reply (with an fd) was read by another call: the
    reply can never be taken, so its fd must close when the PendingRequest goes, not at
    some later read that may never come."""
    server = peer("fds", "pool.fds")
    accepting = dataclasses.replace(config, handle_kinds={"pipe"}, max_handles_per_message=1)
    with alpc.connect("pool.fds", config=accepting, timeout=10) as comm:
        pending = comm.start_request(b"pipe", timeout=10)
        inode = server.expect("PIPE")[0]
        assert comm.request(b"other", timeout=10).data == b"ok"  # its read files the pipe's reply too
        assert f"pipe:[{inode}]" in _fd_targets()
        del pending
        gc.collect()
        assert f"pipe:[{inode}]" not in _fd_targets(), "the unreadable reply still holds the fd"


def _fd_targets() -> set[str]:
    targets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return targets


def test_idle_sections_of_one_connection_do_not_starve_another_of_the_port_budget(  # type: ignore[no-untyped-def]
        broker, config, peer) -> None:
    """A port whose max_port_section_bytes holds one section: client A's large reply leaves
    a pooled section behind, idle once A released it. Client B's large reply must still get
    its space: nothing A will ever release can free it, so waiting for releases (README:
    "the send waits for releases") waits in vain, unless the port takes back idle sections
    of its other connections."""
    server = peer("budget", "pool.budget")
    with alpc.connect("pool.budget", config=config, timeout=10) as first, \
            alpc.connect("pool.budget", config=config, timeout=10) as second:
        server.expect("ACCEPTED")
        assert len(first.request(b"big", timeout=10).data) == 3 * MIB  # copied out: released
        assert first.request(b"sync", timeout=10).data == b"ok"  # the release was read by now
        try:
            answer = second.request(b"big", timeout=10).data
        except (alpc.Timeout, alpc.ConnectionClosed) as exc:  # the server dropped it as "not reading"
            pytest.fail(f"starved by the first connection's idle section: {exc!r}; server: {server.stderr()}")
        assert len(answer) == 3 * MIB, answer[:20]
        assert first.request(b"sync", timeout=10).data == b"ok"  # and the first still works
        assert len(first.request(b"big", timeout=10).data) == 3 * MIB

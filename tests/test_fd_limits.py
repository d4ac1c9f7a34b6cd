"""fds at the edge: a server whose fd table is full, and replies with fds nobody took.

Peers: tests/fd_limit_peers.py (a real server process; the clients are this process).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "fd_limit_peers.py"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pipe_config(runtime_dir: Path) -> alpc.Config:
    return alpc.Config(runtime_dir=runtime_dir, handle_kinds={"pipe"}, max_handles_per_message=4)


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    """Pipe ends to send (the server gets copies); closed at the end."""
    ends: list[int] = []
    for _ in range(3):
        ends.extend(os.pipe())
    yield ends
    for fd in ends:
        os.close(fd)


def start_server(spawn, runtime_dir: Path, name: str):  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(PEERS), "server", name, str(runtime_dir)])
    server.expect("READY")
    return server


def test_a_server_out_of_fds_does_not_blame_the_client_whose_fds_it_could_not_take(
        broker: alpc.Broker, spawn, runtime_dir: Path, pipe_config: alpc.Config, pipes: list[int]) -> None:  # type: ignore[no-untyped-def]
    server = start_server(spawn, runtime_dir, "svc.full")
    with alpc.connect("svc.full", config=pipe_config, timeout=5) as hog1, \
            alpc.connect("svc.full", config=pipe_config, timeout=5) as hog2, \
            alpc.connect("svc.full", config=pipe_config, timeout=5) as innocent:
        for _ in range(3):
            server.expect("ACCEPTED")
        server.send("limit 4")
        server.expect("LIMITED")
        # Each hog keeps two fds in the server, well within its max_inflight_handles (64):
        # together they take the server's last free fd numbers.
        for hog in (hog1, hog2):
            hog.send(b"hold", timeout=5, fds=pipes[:2])
            assert server.expect("HELD") == ["2"]
        # The innocent client's one fd cannot be installed (EMFILE): the kernel says MSG_CTRUNC.
        with pytest.raises(alpc.ConnectionClosed):
            innocent.request(b"hello", timeout=10, fds=pipes[2:3])
        notice = server.expect("NOTICE")
        assert notice[0] == "CLIENT_DIED"
        reason = notice[1].replace("_", " ")
        assert "out of fds" in reason and "RLIMIT" in reason, reason
        assert "protocol error" not in reason, reason
        # The server keeps serving: the hogs let go, and a new client passes an fd.
        assert hog1.request(b"release", timeout=5).data == b"released"
    for _ in range(2):  # the hogs closed (the innocent client's connection had ended)
        assert server.expect("NOTICE")[0] == "PORT_CLOSED"
    with alpc.connect("svc.full", config=pipe_config, timeout=5) as again:
        server.expect("ACCEPTED")
        assert again.request(b"hello", timeout=5, fds=pipes[2:3]).data == b"HELLO fds=1"
    stderr = server.stderr()
    assert "protocol error" not in stderr, stderr


def pipes_open() -> set[str]:
    """The pipes this process holds an fd of (by inode: fd numbers are reused)."""
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # listdir's own fd, closed by now
    return {link for link in links if link.startswith("pipe:")}


def test_close_closes_the_fds_of_a_reply_nobody_took(broker: alpc.Broker, spawn, runtime_dir: Path,  # type: ignore[no-untyped-def]
                                                     pipe_config: alpc.Config) -> None:
    server = start_server(spawn, runtime_dir, "svc.replies")
    before = pipes_open()
    comm = alpc.connect("svc.replies", config=pipe_config, timeout=5)
    server.expect("ACCEPTED")
    pending = comm.start_request(b"pipes:2", timeout=5)
    # Its reply (two pipe ends) is read on the way to this one's, and left for `pending`.
    assert comm.request(b"after", timeout=5).data == b"AFTER fds=0"
    comm.close()
    # Closed with the port, not when the port object (held by `pending`) is collected.
    leaked = pipes_open() - before
    assert not leaked, leaked
    with pytest.raises(alpc.ConnectionClosed):
        pending.result(timeout=1)


def test_an_aio_request_cancelled_as_its_reply_arrives_closes_the_reply_fds(  # type: ignore[no-untyped-def]
        broker: alpc.Broker, spawn, runtime_dir: Path, pipe_config: alpc.Config) -> None:
    import asyncio

    from alpc import aio

    server = start_server(spawn, runtime_dir, "svc.cancelled")

    async def main() -> set[str]:
        comm = await aio.connect("svc.cancelled", config=pipe_config, timeout=5)
        try:
            baseline = pipes_open()
            task = asyncio.create_task(comm.request(b"pipes:2", timeout=5))
            wake = comm._wake_id
            fired = []

            def wake_then_cancel(message_id: int) -> None:
                # The caller gives up just as its reply is filed (a wait_for timeout, say):
                # the reply is in, its task not yet resumed.
                wake(message_id)
                if not fired:
                    fired.append(message_id)
                    task.cancel()

            comm._wake_id = wake_then_cancel  # type: ignore[method-assign]
            with pytest.raises(asyncio.CancelledError):
                await task
            comm._wake_id = wake  # type: ignore[method-assign]
            assert (await comm.request(b"after", timeout=5)).data == b"AFTER fds=0"
            # Nobody will ever take that reply: its pipes are closed, not kept for the connection's life.
            return pipes_open() - baseline
        finally:
            await comm.close()

    leaked = asyncio.run(main())
    server.expect("ACCEPTED")
    assert not leaked, leaked

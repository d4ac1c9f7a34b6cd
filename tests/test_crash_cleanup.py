"""After a SIGKILL nothing is left: a zombie peer's /dev/shm names are swept, and a killed
server's port is released even while a worker it forked holds its registration socket.

A server that starts its own clients (subprocess, multiprocessing) typically
reaps a child only after hearing of its death (CLIENT_DIED). Until then the
dead child is a zombie: its pidfd is readable, but ``kill(pid, 0)`` still
succeeds, and a sweep that trusts only the latter leaves the name for good.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

import alpc
import alpc.aio
from alpc.broker import list_ports
from alpc.wire import MessageType

SECTION_PEERS = Path(__file__).resolve().parent / "section_peers.py"
CRASH_PEERS = Path(__file__).resolve().parent / "crash_peers.py"


def _start_streamer(spawn, runtime_dir: Path, name: str):  # type: ignore[no-untyped-def]
    return spawn.argv([sys.executable, str(SECTION_PEERS), "streamer", name, "--runtime-dir",
                       str(runtime_dir), "--leave-name", "--size", "1000"])


@pytest.mark.timeout(60)
def test_a_zombie_peers_leftover_name_is_swept(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    with alpc.create_port("svc.zsweep", config=config) as port:
        streamer = _start_streamer(spawn, runtime_dir, "svc.zsweep")
        comm = port.listen(timeout=10).accept()
        (name,) = streamer.expect("LEFT")
        streamer.expect("SENDING")
        assert name.lstrip("/") in os.listdir("/dev/shm")
        os.kill(streamer.pid, signal.SIGKILL)  # not reaped: a zombie until the test waits for it
        while True:
            event = port.wait(timeout=10)
            if isinstance(event, alpc.Message) and event.type is alpc.MessageType.CLIENT_DIED:
                break
        try:
            assert comm.closed and name.lstrip("/") not in os.listdir("/dev/shm")
        finally:
            streamer.kill()


@pytest.mark.timeout(60)
def test_a_zombie_peers_leftover_name_is_swept_by_the_aio_driver(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    async def main() -> str:
        async with await alpc.aio.create_port("svc.zsweepa", config=config) as port:
            streamer = _start_streamer(spawn, runtime_dir, "svc.zsweepa")
            request = await port.listen(timeout=10)
            comm = await request.accept()
            (name,) = streamer.expect("LEFT")
            streamer.expect("SENDING")
            assert name.lstrip("/") in os.listdir("/dev/shm")
            os.kill(streamer.pid, signal.SIGKILL)
            try:
                with pytest.raises(alpc.PeerGone):
                    while True:
                        await comm.receive(timeout=10)
                await comm.close()
                return name
            finally:
                streamer.kill()

    name = asyncio.run(main())
    # Checked after the streamer was reaped too: only a sweep made while it was a zombie counts.
    assert name.lstrip("/") not in os.listdir("/dev/shm")


@pytest.mark.timeout(60)
def test_a_killed_servers_port_is_released_while_its_forked_worker_lives(broker, config, spawn,  # type: ignore[no-untyped-def]
                                                                         runtime_dir) -> None:
    server = spawn.argv([sys.executable, str(CRASH_PEERS), "forking-server", "svc.forked", "--runtime-dir",
                         str(runtime_dir)])
    _, worker = (int(word) for word in server.expect("READY"))
    try:
        server.kill()  # SIGKILL and reaped: the worker alone holds the registration socket now
        # The broker sees the owner's death before it reads anything sent after it.
        assert [port.name for port in list_ports(config)] == []
        started = time.monotonic()
        with pytest.raises(alpc.PortNotFound):
            alpc.connect("svc.forked", config=config, timeout=5)
        assert time.monotonic() - started < 2.0
        with alpc.create_port("svc.forked", config=config) as port:
            assert port.name == "svc.forked"
    finally:
        os.kill(worker, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_an_aio_receive_whose_release_finds_the_peer_dead_ends_at_once(broker, config, spawn,  # type: ignore[no-untyped-def]
                                                                       runtime_dir) -> None:
    """A receive with nothing queued first tells the peer of bodies dropped unreleased; when
    that write is what finds the peer dead (its EOF not read yet), the connection ends there
    and the receive must say so, not sleep out its timeout on a waiter nobody will wake."""
    async def main() -> None:
        async with await alpc.aio.create_port("svc.lastrelease", config=config) as port:
            streamer = spawn.argv([sys.executable, str(SECTION_PEERS), "streamer", "svc.lastrelease",
                                   "--runtime-dir", str(runtime_dir), "--count", "1", "--size", "1000"])
            request = await port.listen(timeout=10)
            comm = await request.accept()
            streamer.expect("SENT")
            message = await comm.receive(timeout=10)  # a section body, never released
            os.kill(streamer.pid, signal.SIGKILL)
            os.waitid(os.P_PID, streamer.pid, os.WEXITED | os.WNOWAIT)  # dead; the loop has not run since
            del message  # its release is owed now, and the next receive writes it first
            try:
                with pytest.raises(alpc.PeerGone):
                    notice = await comm.receive(timeout=5)
                    assert notice.type is MessageType.CLIENT_DIED
                    await comm.receive(timeout=5)
            finally:
                streamer.kill()

    asyncio.run(main())

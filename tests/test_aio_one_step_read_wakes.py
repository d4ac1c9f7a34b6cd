"""An asyncio connection's one-step read (``Connection.receive_one``) must wake the senders
waiting for the peer's flow window or for section space, as the general read does.

The one-step path takes a plain reply, and (since the section fast paths) a RELEASE riding
just before a plain frame: the reply frees a slot of the peer's request window, the release
frees section space. ``_on_readable`` woke only the reply's (or the inbox's) waiters and
returned, skipping ``_wake_senders``: a request waiting for the window (nothing re-checks
it) waited for its whole timeout, for ever without one; a sender waiting for section space
waited for its next re-ask timer instead of the release.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from async_steps import LOOPS, in_thread, run_on, until

import alpc
from alpc import aio

PEERS = Path(__file__).resolve().parent / "aio_release_peers.py"

pytestmark = pytest.mark.timeout(60)


async def warm_up(comm: aio.AsyncCommunicationPort, server: Any) -> None:
    """One request and reply first: a read from the same sender as the last takes the one-step path."""
    warm = asyncio.ensure_future(comm.request(b"warm", timeout=10))
    await in_thread(server.expect, "REQUEST 4")
    server.send("")
    assert (await warm).data == b"ok"


@pytest.mark.parametrize("loop", LOOPS)
def test_reply_wakes_a_request_waiting_for_the_window(loop: str, broker: alpc.Broker, config: alpc.Config,
                                                      spawn: Any, runtime_dir: Path) -> None:
    name = f"svc.zz.onestep.window.{loop}"
    server = spawn.argv([sys.executable, str(PEERS), "held", name, "--runtime-dir", str(runtime_dir),
                         "--pending", "1"])
    server.expect("READY")

    async def main() -> None:
        comm = await aio.connect(name, config=config, timeout=10)
        try:
            await in_thread(server.expect, "ACCEPTED")
            await warm_up(comm, server)
            first = asyncio.ensure_future(comm.request(b"first", timeout=20))
            await in_thread(server.expect, "REQUEST 5")
            # The server takes one request at a time: the second waits for the first's reply.
            second = asyncio.ensure_future(comm.request(b"second", timeout=5))
            await until(lambda: len(comm._window_waiters) == 1, "the second request to wait for the window")
            server.send("")  # reply to the first: a plain inline reply, read in one step
            assert (await first).data == b"ok"
            await in_thread(server.expect, "REQUEST 6", 10.0)  # the window reopened: the second went out
            server.send("")
            assert (await second).data == b"ok"
        finally:
            await comm.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_release_before_a_reply_wakes_a_sender_waiting_for_space(
        loop: str, broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the read that brings the release may wake the waiter: its re-ask timer is made
    # longer than the test (it would otherwise notice the space within 100 ms).
    monkeypatch.setattr(aio, "SPACE_REASK", (60.0, 60.0))
    name = f"svc.zz.onestep.space.{loop}"
    server = spawn.argv([sys.executable, str(PEERS), "held", name, "--runtime-dir", str(runtime_dir),
                         "--section", "65536"])
    server.expect("READY")

    async def main() -> None:
        comm = await aio.connect(name, config=config, timeout=10)
        try:
            await in_thread(server.expect, "ACCEPTED")
            await warm_up(comm, server)
            # A section body the server copies out on arrival: its release rides with the reply.
            first = asyncio.ensure_future(comm.request(b"a" * 40000, timeout=20))
            await in_thread(server.expect, "REQUEST 40000")
            second = asyncio.ensure_future(comm.create_view(40000, timeout=5))
            await until(lambda: len(comm._space_waiters) == 1, "the view to wait for section space")
            server.send("")  # the reply, with the RELEASE of the first body just before it
            assert (await first).data == b"ok"
            view = await second
            view.release()
        finally:
            await comm.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_release_before_a_datagram_wakes_a_sender_waiting_for_space(
        loop: str, broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aio, "SPACE_REASK", (60.0, 60.0))  # as above: only the read may wake it
    name = f"svc.zz.onestep.space.dg.{loop}"
    server = spawn.argv([sys.executable, str(PEERS), "held", name, "--runtime-dir", str(runtime_dir),
                         "--section", "65536"])
    server.expect("READY")

    async def main() -> None:
        comm = await aio.connect(name, config=config, timeout=10)
        try:
            await in_thread(server.expect, "ACCEPTED")
            await warm_up(comm, server)
            first = asyncio.ensure_future(comm.request(b"a" * 40000, timeout=20))
            await in_thread(server.expect, "REQUEST 40000")
            second = asyncio.ensure_future(comm.create_view(40000, timeout=5))
            await until(lambda: len(comm._space_waiters) == 1, "the view to wait for section space")
            # The server's next write is a datagram: the RELEASE it owes rides just before it.
            server.send("datagram")
            await in_thread(server.expect, "SENT")
            view = await second
            view.release()
            assert (await comm.receive(timeout=5)).data == b"dg"
            server.send("")
            assert (await first).data == b"ok"
        finally:
            await comm.close()

    run_on(loop, main)

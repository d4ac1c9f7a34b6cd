"""An ``AsyncCommunicationPort`` used from another event loop or thread than its own refuses at
once, with a clear RuntimeError, before anything reaches the peer; on the stock loop and uvloop.

Nothing checked: a send from a thread running a loop of its own went out (racing the owner
loop's reader and writer, which share the port's unlocked state) and returned as if nothing
were wrong; a request reached the server and was answered, while its caller got asyncio's
"got Future attached to a different loop" and could not tell whether it had run. The same
for a port kept past the ``asyncio.run`` that made it and used by a later one.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from async_steps import LOOPS, in_thread

import alpc
from alpc import aio

PEERS = Path(__file__).resolve().parent / "aio_misuse_peers.py"

pytestmark = pytest.mark.timeout(60)


def _runner(loop: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """asyncio.run, on the stock loop or on uvloop's."""
    if loop != "uvloop":
        return asyncio.run
    uvloop = pytest.importorskip("uvloop")

    def run(main: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return run


def _outcome(run: Callable[[Coroutine[Any, Any, Any]], Any], main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """What ``main()`` returns or raises on a loop of its own."""
    try:
        return run(main())
    except Exception as exc:
        return exc


def _refused(outcome: object) -> bool:
    return isinstance(outcome, RuntimeError) and "another event loop or thread" in str(outcome)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_port_used_from_another_threads_loop_refuses(loop: str, broker: alpc.Broker, config: alpc.Config,
                                                       spawn: Any, runtime_dir: Path) -> None:
    name = f"svc.aio.foreign.{loop}"
    server = spawn.argv([sys.executable, str(PEERS), "echo", name, "--runtime-dir", str(runtime_dir)])
    server.expect("READY")
    run = _runner(loop)

    async def main() -> None:
        comm = await aio.connect(name, config=config, timeout=10)
        try:
            await in_thread(server.expect, "ACCEPTED")
            # This loop runs meanwhile (it awaits the thread): its reader watches the socket.
            for call in (lambda: comm.send(b"foreign", timeout=5),
                         lambda: comm.request(b"foreign", timeout=5),
                         lambda: comm.send_many([b"foreign"], timeout=5),
                         lambda: comm.receive(timeout=0)):
                outcome = await in_thread(_outcome, run, call)
                assert _refused(outcome), outcome
            # Nothing of those went out: the server's first message is this loop's.
            assert (await comm.request(b"mine", timeout=5)).data == b"MINE"
            assert await in_thread(server.expect, "") == ["REQUEST", "mine"]
        finally:
            await comm.close()

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_port_kept_past_its_loop_refuses(loop: str, broker: alpc.Broker, config: alpc.Config,
                                           spawn: Any, runtime_dir: Path) -> None:
    name = f"svc.aio.stale.{loop}"
    server = spawn.argv([sys.executable, str(PEERS), "echo", name, "--runtime-dir", str(runtime_dir),
                         "--clients", "2"])
    server.expect("READY")
    run = _runner(loop)

    async def open_port() -> aio.AsyncCommunicationPort:
        return await aio.connect(name, config=config, timeout=10)

    comm = run(open_port())
    try:
        server.expect("ACCEPTED")
        outcome = _outcome(run, lambda: comm.request(b"stale", timeout=5))
        assert _refused(outcome), outcome
        outcome = _outcome(run, lambda: comm.send(b"stale", timeout=5))
        assert _refused(outcome), outcome
    finally:
        run(comm.close())  # close() stays allowed: the only way to let go of it
    with alpc.connect(name, config=config, timeout=10) as fresh:
        assert fresh.request(b"next", timeout=5).data == b"NEXT"
    # The stale request never reached the server, nor the datagram.
    assert server.expect("") == ["ACCEPTED"]
    assert server.expect("") == ["REQUEST", "next"]

"""The asyncio port refuses a bad timeout or body exactly where the blocking port does, on the
stock loop and uvloop.

``trim_sections(timeout=-1)`` unmapped the idle sections first and only then refused the
timeout (on a closed port: ConnectionClosed instead of the blocking ValueError), and
``reply()`` to a request its client had cancelled returned silently whatever its timeout
or body, where the blocking ``reply`` raises ValueError / TypeError.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from async_steps import LOOPS, in_thread, run_on

import alpc
from alpc import aio

PEERS = Path(__file__).resolve().parent / "aio_misuse_peers.py"
BAD_TIMEOUTS: list[tuple[object, type[Exception]]] = [(-1, ValueError), ("1", TypeError), (float("nan"), ValueError)]

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("loop", LOOPS)
def test_trim_sections_refuses_a_bad_timeout_as_the_blocking_port(loop: str, broker: alpc.Broker,
                                                                   config: alpc.Config, spawn: Any,
                                                                   runtime_dir: Path) -> None:
    name = f"svc.aio.trim.{loop}"
    server = spawn.argv([sys.executable, str(PEERS), "echo", name, "--runtime-dir", str(runtime_dir),
                         "--clients", "2"])
    server.expect("READY")
    blocking = alpc.connect(name, config=config, timeout=10)
    expected = []
    for timeout, _ in BAD_TIMEOUTS:
        with pytest.raises(Exception) as refused:
            blocking.trim_sections(timeout=timeout)  # type: ignore[arg-type]
        expected.append(type(refused.value))
    blocking.close()
    assert expected == [kind for _, kind in BAD_TIMEOUTS]

    async def main() -> None:
        comm = await aio.connect(name, config=config, timeout=10)
        await comm.close()
        got = []
        for timeout, _ in BAD_TIMEOUTS:
            with pytest.raises(Exception) as refused:
                await comm.trim_sections(timeout=timeout)  # type: ignore[arg-type]
            got.append(type(refused.value))
        assert got == expected

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_reply_to_a_cancelled_request_refuses_bad_arguments(loop: str, broker: alpc.Broker, config: alpc.Config,
                                                             spawn: Any, runtime_dir: Path) -> None:
    name = f"svc.aio.cancelled.{loop}"

    async def main() -> None:
        port = await aio.create_port(name, config=config, timeout=10)
        try:
            client = spawn.argv([sys.executable, str(PEERS), "canceller", name, "--runtime-dir", str(runtime_dir)])
            comm = await (await port.listen(timeout=10)).accept()
            request = await comm.receive(timeout=10)
            assert request.type is alpc.MessageType.REQUEST
            client.send("")  # cancel it now that it is handed out
            after = await comm.receive(timeout=10)  # behind the CANCEL on the socket
            assert bytes(after.data) == b"after" and request.cancelled
            for timeout, kind in BAD_TIMEOUTS:
                with pytest.raises(kind):
                    await comm.reply(request, b"late", timeout=timeout)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await comm.reply(request, 123)  # type: ignore[arg-type]
            await comm.reply(request, b"late", timeout=5)  # a good one is dropped, as before
            client.send("")
            assert (await comm.receive(timeout=10)).type is alpc.MessageType.PORT_CLOSED
            await in_thread(client.proc.wait, 10)
        finally:
            await port.close()

    run_on(loop, main)

"""``AsyncCommunicationPort.send_many`` takes what the blocking ``send_many`` takes, and
refuses what it refuses, on the stock loop and on uvloop.

It measured each item with ``len()``, which counts a buffer's items, not its bytes: a 2-D
buffer (a numpy or ctypes array of rows) much larger than the inline threshold went inline,
the peer refused the frame (a protocol error) and dropped the connection. A body in parts
(a list of buffers, which ``send`` and the blocking ``send_many`` take) was made ``bytes()``
of: TypeError for parts that are buffers, and a list of small ints went out as their bytes.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

import pytest
from async_steps import LOOPS, in_thread, run_on

import alpc
from alpc import aio

PEERS = Path(__file__).resolve().parent / "aio_misuse_peers.py"

pytestmark = pytest.mark.timeout(60)


def _rows() -> object:
    """A 2-D buffer: 2 rows (its len()) of 70000 bytes, past even the 64 KiB inline floor."""
    return (ctypes.c_ubyte * 70_000 * 2)()


@pytest.mark.parametrize("loop", LOOPS)
def test_send_many_matches_the_blocking_api(loop: str, broker: alpc.Broker, config: alpc.Config,
                                            spawn: Any, runtime_dir: Path) -> None:
    name = f"svc.aio.many.{loop}"
    server = spawn.argv([sys.executable, str(PEERS), "echo", name, "--runtime-dir", str(runtime_dir),
                         "--clients", "2"])
    server.expect("READY")

    # What the blocking API does with each item.
    with alpc.connect(name, config=config, timeout=10) as comm:
        server.expect("ACCEPTED")
        with pytest.raises(TypeError) as blocking_rows:
            comm.send_many([_rows()], timeout=5)
        with pytest.raises(TypeError) as blocking_ints:
            comm.send_many([[1, 2, 3]], timeout=5)
        comm.send_many([[b"ab", b"cd"]], timeout=5)
        assert server.expect("DATAGRAM") == ["4", b"abcd".hex()]

    async def main() -> None:
        comm = await aio.connect(name, config=config, timeout=10)
        try:
            await in_thread(server.expect, "ACCEPTED")
            with pytest.raises(TypeError) as rows:
                await comm.send_many([_rows()], timeout=5)
            assert str(rows.value) == str(blocking_rows.value)
            with pytest.raises(TypeError) as ints:
                await comm.send_many([[1, 2, 3]], timeout=5)
            assert str(ints.value) == str(blocking_ints.value)
            await comm.send_many([[b"ab", b"cd"]], timeout=5)
            assert await in_thread(server.expect, "DATAGRAM") == ["4", b"abcd".hex()]
            # The connection is intact: nothing the peer refused went out.
            assert (await comm.request(b"ping", timeout=5)).data == b"PING"
        finally:
            await comm.close()

    run_on(loop, main)

"""``AsyncCommunicationPort.check_length`` (what the asyncio RPC client checks a body with): a
negative size passed as if it fitted, and a non-int raised the comparison's own TypeError
("'>' not supported ..."). A wrong argument is now a clear TypeError / ValueError."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)


def test_check_length_refuses_what_is_no_size(broker: alpc.Broker, config: alpc.Config) -> None:
    async def main() -> None:
        port = await aio.create_port("svc.checklen", config=config, timeout=10)
        try:
            client = asyncio.ensure_future(aio.connect("svc.checklen", config=config, timeout=10))
            request = await port.listen(timeout=10)
            server = await request.accept()
            comm = await client
            try:
                comm.check_length(0)
                comm.check_length(1024)
                with pytest.raises(alpc.MessageTooLarge):
                    comm.check_length(2**62)
                with pytest.raises(ValueError, match="size is >= 0"):
                    comm.check_length(-1)
                bad: Any
                for bad in ("x", 1.5, None, True):
                    with pytest.raises(TypeError, match="a message size is an int"):
                        comm.check_length(bad)
            finally:
                await comm.close()
                await server.close()
        finally:
            await port.close()

    asyncio.run(main())

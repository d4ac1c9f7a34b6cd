"""Peer process for tests/test_rpc_oneway_order.py.

``python tests/rpc_order_peers.py NAME --runtime-dir DIR [--workers N] [--asyncio]`` is an RPC
server for the one-way order tests: it prints ``READY`` once it serves and runs until its stdin
closes.
"""

from __future__ import annotations

import asyncio
import threading

from rpc_peer_serving import serve_until_stdin_closes, server_arguments

from alpc import rpc

# How long the first one-way call waits for the second to start: only a server that lets the
# second overtake (or overlap) the first ever sees it start meanwhile.
OVERTAKE_WINDOW = 1.0
# How long hold() waits for release(): far longer than any test waits for release() itself.
HOLD_LIMIT = 20.0


class Order(rpc.Interface, name="test.rpc.order", version=(1, 0)):
    @rpc.method(oneway=True)
    def step(self, index: int) -> None: ...

    @rpc.method(oneway=True)
    def hold(self, label: str) -> None: ...

    @rpc.method
    def release(self) -> None: ...

    @rpc.method
    def log(self, ended: int, timeout: float) -> list[str]: ...


class OrderImpl(Order):
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._log: list[str] = []
        self._ended = 0
        self._second_started = threading.Event()
        self._released = threading.Event()

    def _record(self, entry: str, ended: bool = False) -> None:
        with self._changed:
            self._log.append(entry)
            self._ended += ended
            self._changed.notify_all()

    def step(self, index: int) -> None:
        self._record(f"start {index}")
        if index == 1:
            self._second_started.set()
        if index == 0:
            self._second_started.wait(OVERTAKE_WINDOW)
        self._record(f"end {index}", ended=True)

    def hold(self, label: str) -> None:
        self._record(f"hold {label}")
        released = self._released.wait(HOLD_LIMIT)
        self._record(f"{'released' if released else 'timed out'} {label}", ended=True)

    def release(self) -> None:
        self._released.set()

    def log(self, ended: int, timeout: float) -> list[str]:
        with self._changed:
            self._changed.wait_for(lambda: self._ended >= ended, timeout)
            return list(self._log)


class AsyncOrderImpl(Order):
    """The same on rpc.aio.Server, its one-way calls coroutines (each awaited in its own task)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._log: list[str] = []
        self._ended = 0
        self._second_started = asyncio.Event()

    async def _record(self, entry: str, ended: bool = False) -> None:
        async with self._changed:
            self._log.append(entry)
            self._ended += ended
            self._changed.notify_all()

    async def step(self, index: int) -> None:  # type: ignore[override]
        await self._record(f"start {index}")
        if index == 1:
            self._second_started.set()
        if index == 0:
            try:
                await asyncio.wait_for(self._second_started.wait(), OVERTAKE_WINDOW)
            except TimeoutError:
                pass
        await self._record(f"end {index}", ended=True)

    async def log(self, ended: int, timeout: float) -> list[str]:  # type: ignore[override]
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._ended >= ended), timeout)
            except TimeoutError:
                pass
            return list(self._log)


def main() -> None:
    serve_until_stdin_closes(server_arguments(workers=4).parse_args(), OrderImpl, AsyncOrderImpl)


if __name__ == "__main__":
    main()

"""Peer process for tests/test_rpc_oneway_order.py.

``python tests/rpc_order_peers.py NAME --runtime-dir DIR [--workers N] [--asyncio]`` is an RPC
server for the one-way order tests: it prints ``READY`` once it serves and runs until its stdin
closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading

import alpc
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
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--asyncio", action="store_true")
    args = parser.parse_args()
    config = alpc.Config.from_env(args.runtime_dir)
    if args.asyncio:
        async def serve() -> None:
            async with rpc.aio.Server(args.name, AsyncOrderImpl(), config=config):
                print("READY", os.getpid(), flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

        asyncio.run(serve())
        return
    with rpc.Server(args.name, OrderImpl(), workers=args.workers, config=config):
        print("READY", os.getpid(), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()

"""Peer process for tests/test_rpc_oneway_backlog.py: an RPC server whose one-way calls wait.

``python tests/rpc_oneway_peers.py NAME --runtime-dir DIR [--workers N] [--asyncio]`` serves
``Queue`` on a blocking rpc.Server (or rpc.aio.Server), prints ``READY`` once it serves and runs
until its stdin closes. The library's ``alpc.rpc`` log goes to stderr at DEBUG, where the tests
look for what the server says of the calls it drops.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

from rpc_peer_serving import serve_until_stdin_closes, server_arguments

from alpc import rpc

# How long hold() waits for release(): far longer than any test waits for release() itself.
HOLD_LIMIT = 20.0


class Queue(rpc.Interface, name="test.rpc.oneway-queue", version=(1, 0)):
    @rpc.method(oneway=True)
    def hold(self, label: str, interrupt: bool = False) -> None: ...

    @rpc.method(oneway=True)
    def step(self, label: str) -> None: ...

    @rpc.method
    def release(self) -> None: ...

    @rpc.method
    def log(self, entries: int, timeout: float) -> list[str]: ...


class QueueImpl(Queue):
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._log: list[str] = []
        self._released = threading.Event()

    def _record(self, entry: str) -> None:
        with self._changed:
            self._log.append(entry)
            self._changed.notify_all()

    def hold(self, label: str, interrupt: bool = False) -> None:
        self._record(f"hold {label}")
        released = self._released.wait(HOLD_LIMIT)
        self._record(f"{'released' if released else 'timed out'} {label}")
        if interrupt:
            raise KeyboardInterrupt(label)  # not an Exception: propagates out of the worker

    def step(self, label: str) -> None:
        self._record(label)

    def release(self) -> None:
        self._released.set()

    def log(self, entries: int, timeout: float) -> list[str]:
        with self._changed:
            self._changed.wait_for(lambda: len(self._log) >= entries, timeout)
            return list(self._log)


class AsyncQueueImpl(Queue):
    """The same on rpc.aio.Server, hold() a coroutine that awaits release()."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._log: list[str] = []
        self._released = asyncio.Event()

    async def _record(self, entry: str) -> None:
        async with self._changed:
            self._log.append(entry)
            self._changed.notify_all()

    async def hold(self, label: str, interrupt: bool = False) -> None:  # type: ignore[override]
        await self._record(f"hold {label}")
        try:
            await asyncio.wait_for(self._released.wait(), HOLD_LIMIT)
            await self._record(f"released {label}")
        except TimeoutError:
            await self._record(f"timed out {label}")

    async def step(self, label: str) -> None:  # type: ignore[override]
        await self._record(label)

    def release(self) -> None:
        self._released.set()

    async def log(self, entries: int, timeout: float) -> list[str]:  # type: ignore[override]
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: len(self._log) >= entries), timeout)
            except TimeoutError:
                pass
            return list(self._log)


def main() -> None:
    args = server_arguments(workers=3).parse_args()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    library_log = logging.getLogger("alpc.rpc")
    library_log.addHandler(handler)
    library_log.setLevel(logging.DEBUG)
    serve_until_stdin_closes(args, QueueImpl, AsyncQueueImpl)


if __name__ == "__main__":
    main()

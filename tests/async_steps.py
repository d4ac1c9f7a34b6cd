"""Steps the asyncio tests share: run a test on the stock loop or uvloop, run a blocking call
off the loop, and let the loop turn until something holds (one loop turn per try, never a sleep)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

__all__ = ["LOOPS", "in_thread", "run_on", "until"]

LOOPS = ["asyncio", "uvloop"]


def _open_uvloop_once() -> None:
    """uvloop keeps one pipe pair for the whole process from its first loop on: open that loop
    now, at collection, so the leak check of the first uvloop test does not count uvloop's own."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.new_event_loop().close()


_open_uvloop_once()


def run_on(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on the stock asyncio loop or on uvloop's (alpc.aio promises both)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        asyncio.run(main())


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def until(predicate: Callable[[], bool], what: str, spins: int = 10_000) -> None:
    """Let the loop run until ``predicate()`` holds (no sleeps: one loop turn per spin)."""
    for _ in range(spins):
        if predicate():
            return
        await asyncio.sleep(0)  # handshake-free: one loop turn, not a wait
    raise AssertionError(f"never happened: {what}")

"""Steps the asyncio tests share: run a blocking call off the loop, and let the loop turn
until something holds (one loop turn per try, never a sleep)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["in_thread", "until"]


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def until(predicate: Callable[[], bool], what: str, spins: int = 10_000) -> None:
    """Let the loop run until ``predicate()`` holds (no sleeps: one loop turn per spin)."""
    for _ in range(spins):
        if predicate():
            return
        await asyncio.sleep(0)  # handshake-free: one loop turn, not a wait
    raise AssertionError(f"never happened: {what}")

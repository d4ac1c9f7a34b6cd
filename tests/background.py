"""A function run on a thread of its own, what it returned or raised kept for the test thread.

An exception raised on a plain thread is printed and lost; the tests that run a server loop or
a client call beside the test thread check what it ended with instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Background"]

T = TypeVar("T")


class Background(Generic[T]):
    """``target()`` on a daemon thread, started at once; ``outcomes`` gets its return value or
    its exception when it ends."""

    def __init__(self, target: Callable[[], T]) -> None:
        self.outcomes: list[T | BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self.thread.start()

    def _run(self, target: Callable[[], T]) -> None:
        try:
            self.outcomes.append(target())
        except BaseException as exc:  # handed to the test thread
            self.outcomes.append(exc)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

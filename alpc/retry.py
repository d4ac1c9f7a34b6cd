"""Backoff for whatever retries: a client's connect, a server's re-registration."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from .transport import deadline_after, remaining

__all__ = ["Backoff", "retry_until"]

T = TypeVar("T")


class Backoff:
    """Exponential delays from ``initial`` up to ``maximum``, each jittered down by up to ``jitter``.

    The jitter keeps many clients that lost the same broker from all coming
    back in the same millisecond.
    """

    def __init__(self, initial: float = 0.01, maximum: float = 0.5, factor: float = 2.0, jitter: float = 0.3) -> None:
        if not 0 < initial <= maximum or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("Backoff needs 0 < initial <= maximum, factor >= 1 and 0 <= jitter < 1")
        self._next = initial
        self._maximum = maximum
        self._factor = factor
        self._jitter = jitter

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._maximum, self._next * self._factor)
        return delay * (1 - self._jitter * random.random())


def retry_until(
    call: Callable[[], T],
    retry_timeout: float,
    retry_on: tuple[type[BaseException], ...],
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``call`` until it succeeds; retry ``retry_on`` errors with backoff for ``retry_timeout`` seconds.

    No new attempt starts after the retry deadline; the last error is raised then.
    """
    deadline = deadline_after(retry_timeout)
    backoff = backoff or Backoff()
    while True:
        try:
            return call()
        except retry_on:
            left = remaining(deadline)
            if left is not None and left <= 0:
                raise
            delay = backoff.next_delay()
            sleep(delay if left is None else min(delay, left))

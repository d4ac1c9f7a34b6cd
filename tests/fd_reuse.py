"""Helpers the leak and fd-reuse tests share: a freed fd number taken again, and a client
calling from a thread of the test process."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import alpc

__all__ = ["connect_in_thread", "fd_numbered"]


def fd_numbered(number: int, keep: list[int]) -> bool:
    """Open pipes (kept in ``keep``) until one end gets fd ``number``; False if the kernel never gives it."""
    for _ in range(64):
        r, w = os.pipe()
        keep.extend((r, w))
        if number in (r, w):
            return True
        if min(r, w) > number:
            return False
    return False


def connect_in_thread(config: alpc.Config, name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """A client connecting (and then calling once) from another thread; the outcome in the dict."""
    outcome: dict[str, Any] = {"connected": threading.Event()}

    def client() -> None:
        try:
            with alpc.connect(name, config=config, timeout=10) as port:
                outcome["quick"] = port._quick is not None
                outcome["connected"].set()
                started = time.monotonic()
                try:
                    port.request(b"ping", timeout=10)
                except BaseException as exc:  # handed to the test thread
                    outcome["error"] = exc
                outcome["took"] = time.monotonic() - started
        except BaseException as exc:
            outcome["connect_error"] = exc
            outcome["connected"].set()

    thread = threading.Thread(target=client)
    thread.start()
    return thread, outcome

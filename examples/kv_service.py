"""A longer-running program that embeds an alpc RPC service: a key-value store with expiry.

The program's own main loop keeps running (here: expiring keys and reporting
stats); the RPC server answers clients from its own worker threads. Run a
broker (`alpc broker`), then this, then `examples/kv_cli.py`.

    python examples/kv_service.py [--name examples.kv] [--workers 4]

Prints READY once it serves; SIGTERM or SIGINT stops it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Any

from kv_api import PORT_NAME, KeyValue

from alpc import rpc


class Store(KeyValue):
    """The implementation: shared by the RPC worker threads and the program's main loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, bytes] = {}
        self._expiry: dict[str, float] = {}
        self.counters = {"get": 0, "set": 0, "delete": 0, "expired": 0}

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self.counters["get"] += 1
            if self._expired(key, time.monotonic()):
                return None
            return self._data.get(key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        # A large value arrives as a read-only view of the message; keep a copy.
        copy = bytes(value)
        with self._lock:
            self.counters["set"] += 1
            self._data[key] = copy
            if ttl is None:
                self._expiry.pop(key, None)
            else:
                self._expiry[key] = time.monotonic() + float(ttl)

    def delete(self, key: str) -> bool:
        with self._lock:
            self.counters["delete"] += 1
            self._expiry.pop(key, None)
            return self._data.pop(key, None) is not None

    def keys(self, prefix: str = "") -> list[str]:
        now = time.monotonic()
        with self._lock:
            return sorted(k for k in self._data if k.startswith(prefix) and not self._expired(k, now))

    def stats(self) -> dict[str, Any]:
        caller = rpc.current_call().caller
        with self._lock:
            return {**self.counters, "keys": len(self._data), "asked_by_pid": caller.pid}

    def dump(self, prefix: str, sink: Any) -> int:
        with self._lock:
            items = [(k, v) for k, v in sorted(self._data.items()) if k.startswith(prefix)]
        for key, value in items:  # not under the lock: the callback may call us back
            sink(key, value)
        return len(items)

    def clear(self) -> int:
        with self._lock:
            count = len(self._data)
            self._data.clear()
            self._expiry.clear()
            return count

    # -- used by the program's own loop, not over RPC ----------------------------

    def _expired(self, key: str, now: float) -> bool:
        deadline = self._expiry.get(key)
        return deadline is not None and deadline <= now

    def expire(self) -> int:
        now = time.monotonic()
        with self._lock:
            gone = [k for k, deadline in self._expiry.items() if deadline <= now]
            for key in gone:
                del self._data[key], self._expiry[key]
            self.counters["expired"] += len(gone)
        return len(gone)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=PORT_NAME)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tick", type=float, default=0.05, help="seconds between expiry sweeps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="kv_service: %(message)s")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    store = Store()
    with rpc.Server(args.name, store, workers=args.workers):
        print(f"READY serving {args.name!r}", flush=True)
        # The program's own work goes on while the server answers clients.
        while not stop.wait(args.tick):
            expired = store.expire()
            if expired:
                print(f"expired {expired} key(s)", flush=True)
    print(f"stopped: {store.counters}", flush=True)


if __name__ == "__main__":
    main()

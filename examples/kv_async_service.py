"""The key-value service of examples/kv_service.py as an asyncio program (rpc.aio.Server).

Same interface (kv_api.KeyValue), same clients (examples/kv_cli.py works
unchanged): every call runs as a task on the program's event loop, beside the
program's own task that expires keys. No thread per client. ``dump`` is a
coroutine: it awaits the client's callback for each key.

    python examples/kv_async_service.py [--name examples.kv]

Prints READY once it serves; SIGTERM or SIGINT stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from kv_api import PORT_NAME
from kv_service import Store

from alpc import rpc


class AsyncStore(Store):
    """Store's handlers are quick and run on the loop as they are; the one that waits is async."""

    async def dump(self, prefix: str, sink: Any) -> int:  # type: ignore[override]
        with self._lock:
            items = [(k, v) for k, v in sorted(self._data.items()) if k.startswith(prefix)]
        for key, value in items:
            await sink(key, value)  # a call back into the client: the loop serves others meanwhile
        return len(items)


async def serve(name: str, tick: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    store = AsyncStore()
    async with rpc.aio.Server(name, store):
        print(f"READY serving {name!r}", flush=True)
        # The program's own work goes on while the server answers clients.
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), tick)
            except TimeoutError:
                expired = store.expire()
                if expired:
                    print(f"expired {expired} key(s)", flush=True)
    print(f"stopped: {store.counters}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=PORT_NAME)
    parser.add_argument("--tick", type=float, default=0.05, help="seconds between expiry sweeps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="kv_async_service: %(message)s")
    asyncio.run(serve(args.name, args.tick))


if __name__ == "__main__":
    main()

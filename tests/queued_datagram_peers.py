"""Peers for tests/test_queued_datagrams_delivery.py: datagram batching across real processes.

Run as ``python tests/queued_datagram_peers.py ROLE NAME --runtime-dir DIR``. Each role prints
``READY`` once set up and then one line per step, so the tests synchronise on lines.

- ``dropper``: connects to NAME (blocking, or asyncio with ``--aio``), queues ``--count``
  datagrams with ``send(..., flush=False)``, prints ``QUEUED`` and exits normally without
  closing its port (a script's global, still referenced when the interpreter exits).
"""

from __future__ import annotations

import argparse
import asyncio

import alpc
from alpc import aio

# The dropper's port: referenced until the interpreter exits, as a script's global would be.
KEPT: list[object] = []


def say(*parts: object) -> None:
    print(*parts, flush=True)


def dropper(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    bodies = [b"queued-%d" % index for index in range(args.count)]
    if args.aio:
        async def main() -> None:
            comm = await aio.connect(args.name, config=config, timeout=30)
            say("READY")
            for body in bodies:
                await comm.send(body, flush=False)
            say("QUEUED")
            KEPT.append(comm)  # never closed

        asyncio.run(main())
        return
    comm = alpc.connect(args.name, config=config, timeout=30)
    say("READY")
    for body in bodies:
        comm.send(body, flush=False)
    say("QUEUED")
    KEPT.append(comm)  # never closed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["dropper"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--aio", action="store_true")
    args = parser.parse_args()
    dropper(args)


if __name__ == "__main__":
    main()

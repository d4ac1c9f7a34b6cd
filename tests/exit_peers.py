"""Peers for the exit tests (tests/test_exit_*.py): processes that end without tidying up.

Run as ``python tests/exit_peers.py ROLE NAME --runtime-dir DIR``. Each role prints one line
per step, so the tests synchronise on lines.

- ``deaf``: connects to NAME ``--deaf`` times (blocking, or asyncio with ``--aio``), sends on
  each connection until its socket is full (no room left, no frame cut; the server never reads
  them), queues one datagram on each with ``send(..., flush=False)``, then connects once more
  and queues ``live`` there (a server that reads). Prints ``QUEUED`` and exits normally
  without closing any port.
- ``completion``: serves NAME (``send_timeout`` 30 s) with a CompletionPort and an async
  handler, its ``serve()`` on a daemon thread; prints ``READY``, then ``HANDLED`` once
  ``--requests`` requests were handled (a client that never reads: the later replies wait for
  its socket), then on a line from stdin ``EXITING``, and ends normally without stopping.
- ``cut-short``: connects to NAME with asyncio, sends until its socket is full, starts a send
  of ``last`` that waits for room, queues ``queued`` with ``flush=False``, prints ``QUEUED N``
  (N: the datagrams sent before) and returns from ``asyncio.run()`` (which cancels the waiting
  send); then, on a line from stdin (the server has read meanwhile), ends without closing its port.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading

import alpc
from alpc import aio
from alpc.completion import CompletionPort

# The ports: referenced until the interpreter exits, as a script's globals would be.
KEPT: list[object] = []
FILLER = b"x" * 200


def say(*parts: object) -> None:
    print(*parts, flush=True)


def deaf(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    if args.aio:
        async def main() -> None:
            for _ in range(args.deaf):
                comm = await aio.connect(args.name, config=config, timeout=30)
                KEPT.append(comm)
                while comm._stream.send_room() > 0:  # each write goes whole while there is room
                    await comm.send(FILLER)
                await comm.send(b"queued", flush=False)
            live = await aio.connect(args.name, config=config, timeout=30)
            KEPT.append(live)
            await live.send(b"live", flush=False)
            say("QUEUED")

        asyncio.run(main())
        return
    for _ in range(args.deaf):
        comm = alpc.connect(args.name, config=config, timeout=30)
        KEPT.append(comm)
        while comm._stream.send_room() > 0:  # each write goes whole while there is room
            comm.send(FILLER)
        comm.send(b"queued", flush=False)
    live = alpc.connect(args.name, config=config, timeout=30)
    KEPT.append(live)
    live.send(b"live", flush=False)
    say("QUEUED")


def completion(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    port = alpc.create_port(args.name, alpc.PortAttributes(send_timeout=30), config=config)
    handled = 0

    async def handler(message: alpc.Message) -> bytes:
        nonlocal handled
        handled += 1
        if handled == args.requests:
            say("HANDLED")
        return FILLER

    serving = CompletionPort(port, handler)
    KEPT.append(serving)
    threading.Thread(target=serving.serve, daemon=True).start()
    say("READY")
    sys.stdin.readline()
    say("EXITING")


def cut_short(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)

    async def main() -> int:
        comm = await aio.connect(args.name, config=config, timeout=30)
        KEPT.append(comm)
        sent = 0
        while comm._stream.send_room() > 0:  # each write goes whole while there is room
            await comm.send(FILLER)
            sent += 1
        waiting = asyncio.ensure_future(comm.send(b"last"))
        KEPT.append(waiting)
        while not comm._unsent:  # it runs up to its wait for room: its frame is the loop's to write
            await asyncio.sleep(0)  # handshake-free: one loop turn at a time until the send is parked
        await comm.send(b"queued", flush=False)
        return sent

    sent = asyncio.run(main())
    say("QUEUED", sent)  # the loop is closed: it writes nothing more
    sys.stdin.readline()  # the server reads meanwhile: room for what the exit writes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["deaf", "completion", "cut-short"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--deaf", type=int, default=8)
    parser.add_argument("--aio", action="store_true")
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    {"deaf": deaf, "completion": completion, "cut-short": cut_short}[args.role](args)


if __name__ == "__main__":
    main()

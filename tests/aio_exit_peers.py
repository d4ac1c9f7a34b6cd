"""Peers for tests/test_exit_aio_port_closed.py.

``python tests/aio_exit_peers.py aio-exit-holding NAME --runtime-dir DIR [--queue]``: connect
with the asyncio driver on a daemon thread whose loop keeps the port open (never closes it),
print ``CONNECTED``, then, on a stdin line, let the interpreter exit normally (sys.exit) while
that loop still waits in receive(). ``--queue`` first queues a datagram (send(flush=False)).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading

import alpc
from alpc import aio


def say(*parts: object) -> None:
    print(*parts, flush=True)


def aio_exit_holding(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    connected = threading.Event()
    failed: list[BaseException] = []

    async def hold() -> None:
        try:
            comm = await aio.connect(args.name, config=config, timeout=10)
        except BaseException as exc:
            failed.append(exc)
            connected.set()
            return
        if args.queue:
            await comm.send(b"queued", flush=False)  # goes out at exit, before the notice
        connected.set()
        try:
            await comm.receive(timeout=60)
        except alpc.AlpcError:
            pass

    threading.Thread(target=asyncio.run, args=(hold(),), daemon=True).start()
    connected.wait(30)
    if failed:
        raise failed[0]
    say("CONNECTED")
    sys.stdin.readline()  # "exit"
    sys.exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["aio-exit-holding"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--queue", action="store_true")
    args = parser.parse_args()
    {"aio-exit-holding": aio_exit_holding}[args.role](args)


if __name__ == "__main__":
    main()

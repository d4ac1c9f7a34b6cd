"""Real server processes for the cancel, deadline, batching and completion-port tests.

Run as ``python tests/flow_peers.py ROLE NAME --runtime-dir DIR``. Each prints
``READY`` once its port exists and one line per event after, so tests wait on
lines, never on sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import alpc
from alpc import aio


def say(*parts: object) -> None:
    print(*parts, flush=True)


def watch(args: argparse.Namespace) -> None:
    """One client; requests "slow" poll ``message.cancelled``, "hold" waits for a stdin line."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, config=config) as port:
        say("READY", os.getpid())
        comm = port.listen(timeout=30).accept()
        counted = 0
        while True:
            message = comm.receive(timeout=30)
            if message.type is alpc.MessageType.DATAGRAM:
                counted += 1
                if message.data != str(counted).encode():
                    say("DISORDER", counted, message.data.decode())
                continue
            if message.type is not alpc.MessageType.REQUEST:
                say(message.type.name)
                return
            text = message.data.decode()
            say("GOT", text, "deadline" if message.deadline is not None else "-")
            if text == "slow":
                stop = time.monotonic() + 10
                while not message.cancelled and time.monotonic() < stop:
                    # Nobody else reads this port while its only thread handles: read now and then.
                    comm.pump()
                    time.sleep(0.005)  # handshake-free: a sync handler polls its flag, as documented
                say("SAW_CANCEL" if message.cancelled else "NO_CANCEL")
                message.reply(b"late")  # dropped by the runtime
            elif text == "hold":
                sys.stdin.readline()
                message.reply(b"held")
            elif text == "count":
                message.reply(str(counted).encode())
            else:
                message.reply(text.upper().encode())


async def async_serve(args: argparse.Namespace) -> None:
    """An asyncio server: echo, "slow" waits to be cancelled, "count" counts datagrams."""
    config = alpc.Config.from_env(args.runtime_dir)
    counted = 0

    async def handle(message: alpc.Message) -> bytes | None:
        nonlocal counted
        if message.type is alpc.MessageType.DATAGRAM:
            counted += 1
            return None
        if message.data == b"slow":
            say("GOT slow")
            try:
                await asyncio.sleep(30)  # handshake-free: stands for a slow handler, ended by the cancel under test
            except asyncio.CancelledError:
                say("CANCELLED_ERROR")
                raise
        if message.data == b"count":
            return str(counted).encode()
        return message.data.upper()

    async with await aio.create_port(args.name, config=config) as port:
        say("READY", os.getpid())
        await port.serve(handle, timeout=30)


def completion(args: argparse.Namespace) -> None:
    """A completion-port server: sync echo handlers on a pool; "slow" polls its flag."""
    config = alpc.Config.from_env(args.runtime_dir)

    def handle(message: alpc.Message) -> bytes | None:
        if message.type is not alpc.MessageType.REQUEST:
            return None
        if message.data == b"slow":
            say("GOT slow")
            stop = time.monotonic() + 10
            while not message.cancelled and time.monotonic() < stop:
                time.sleep(0.005)  # handshake-free: a sync handler polls its flag, as documented
            say("SAW_CANCEL" if message.cancelled else "NO_CANCEL")
            return b"late"
        if message.data.startswith(b"order:"):
            return message.data[6:]
        return message.data.upper()

    with alpc.create_port(args.name, config=config) as port, \
            alpc.CompletionPort(port, handle, max_workers=args.workers, ordered=args.ordered) as server:
        say("READY", os.getpid())
        server.serve(timeout=args.timeout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["watch", "async", "completion"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--ordered", action="store_true")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    if args.role == "watch":
        watch(args)
    elif args.role == "async" and args.loop == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(async_serve(args))
    elif args.role == "async":
        asyncio.run(async_serve(args))
    else:
        completion(args)


if __name__ == "__main__":
    main()

"""Peer processes for tests/test_aio_connect_cancel.py and test_exit_daemon_thread.py.

Run as ``python tests/lifecycle_peers.py ROLE NAME --runtime-dir DIR``; prints one line per
event and waits for stdin lines where the test orders the steps (no sleeps).
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


def hold_request(args: argparse.Namespace) -> None:
    """Take one connection request, say REQUEST, and accept it only on stdin "accept":
    ACCEPTED, or GONE and the error's type if its client went away meanwhile."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, config=config) as port:
        say("READY")
        request = port.listen(timeout=30)
        say("REQUEST")
        sys.stdin.readline()
        try:
            comm = request.accept()
        except alpc.ConnectionClosed as exc:
            say("GONE", type(exc).__name__)
            return
        say("ACCEPTED")
        comm.close()


def exit_holding(args: argparse.Namespace) -> None:
    """Connect on a daemon thread that keeps the port open (never closes it), then let the
    interpreter exit normally (sys.exit) while that thread still waits in receive(); with
    ``--asyncio``, through the asyncio driver on that thread's loop. ``--queue`` first queues
    a datagram (send(flush=False)), which goes out at exit, before the notice."""
    config = alpc.Config.from_env(args.runtime_dir)
    connected = threading.Event()
    failed: list[BaseException] = []

    def hold() -> None:
        try:
            comm = alpc.connect(args.name, config=config, timeout=10)
        except BaseException as exc:
            failed.append(exc)
            connected.set()
            return
        if args.queue:
            comm.send(b"queued", flush=False)
        connected.set()
        try:
            comm.receive(timeout=60)
        except alpc.AlpcError:
            pass

    async def hold_on_loop() -> None:
        try:
            comm = await aio.connect(args.name, config=config, timeout=10)
        except BaseException as exc:
            failed.append(exc)
            connected.set()
            return
        if args.queue:
            await comm.send(b"queued", flush=False)
        connected.set()
        try:
            await comm.receive(timeout=60)
        except alpc.AlpcError:
            pass

    holder = threading.Thread(target=asyncio.run, args=(hold_on_loop(),), daemon=True) if args.asyncio \
        else threading.Thread(target=hold, daemon=True)
    holder.start()
    connected.wait(30)
    if failed:
        raise failed[0]
    say("CONNECTED")
    sys.stdin.readline()  # "exit"
    sys.exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["hold-request", "exit-holding"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--queue", action="store_true")
    parser.add_argument("--asyncio", action="store_true")
    args = parser.parse_args()
    {"hold-request": hold_request, "exit-holding": exit_holding}[args.role](args)


if __name__ == "__main__":
    main()

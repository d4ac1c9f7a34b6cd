"""Peer processes for tests/test_aio_faults.py.

Run as ``python tests/aio_fault_peers.py ROLE NAME --runtime-dir DIR``. Prints
``READY`` once its port exists, then one line per event; waits for stdin lines where
the test must control the order (no sleeps).
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def describe(message: alpc.Message) -> str:
    data = message.data
    if not data:
        return "empty"
    first = chr(data[0])
    uniform = "uniform" if data == data[:1] * len(data) else "mixed"
    return f"{first} {uniform} {len(data)}"


def hold(args: argparse.Namespace) -> None:
    """One client. With --hold-accept, waits for stdin "accept" before accepting.
    Then waits for stdin "read" and reports every message: BIG for a datagram over 256
    bytes (its first byte, whether every byte is that one, its length), SMALL counts."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, config=config) as port:
        say("READY", os.getpid())
        request = port.listen(timeout=30)
        say("REQUEST", request.client.pid)
        if args.hold_accept:
            sys.stdin.readline()
        try:
            comm = request.accept()
        except alpc.ConnectionClosed as exc:  # its client gave up meanwhile (a cancelled connect)
            say("GONE", type(exc).__name__)
            return
        say("ACCEPTED")
        if not args.hold_accept:
            sys.stdin.readline()  # "read"
        small = 0
        while True:
            try:
                message = comm.receive(timeout=30)
            except alpc.Timeout:
                say("QUIET")
                return
            except alpc.ConnectionClosed as exc:
                say("GONE", type(exc).__name__)
                return
            if message.type is alpc.MessageType.DATAGRAM:
                if message.size > 256:
                    say("BIG", describe(message), "after", small)
                else:
                    small += 1
                continue
            if message.type is alpc.MessageType.REQUEST:
                say("REQ", describe(message))
                if message.data == b"slow":
                    import time
                    stop = time.monotonic() + 5
                    while not message.cancelled and time.monotonic() < stop:
                        comm.pump()
                        time.sleep(0.005)  # handshake-free: a sync handler polls its cancel flag, as documented
                    say("SAW_CANCEL" if message.cancelled else "NO_CANCEL")
                message.reply(message.data.upper())
                continue
            say(message.type.name)
            return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["hold"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--hold-accept", action="store_true")
    args = parser.parse_args()
    hold(args)


if __name__ == "__main__":
    main()

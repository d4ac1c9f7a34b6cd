"""Peer processes for the per-connection state tests (test_ready_queue_leaks.py,
test_qlpc_server_request.py, test_aio_receive_waiters.py):
``python state_peers.py ROLE NAME --runtime-dir DIR``.

Each prints READY once connected, then one line per event; it exits when stdin closes.
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def answering_client(args: argparse.Namespace) -> None:
    """Connects (taking Quick-LPC rings when offered) and answers the server's requests."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.connect(args.name, config=config, timeout=10) as comm:
        say("READY", os.getpid(), comm.quick)
        for line in sys.stdin:
            if line.strip() != "answer":
                continue
            message = comm.receive(timeout=10)
            comm.reply(message, message.data.upper())
            say("ANSWERED", message.data.decode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["answering-client"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    args = parser.parse_args()
    answering_client(args)


if __name__ == "__main__":
    main()

"""Real server processes for tests/test_interrupted_requests and test_send_lock_timeouts.py.

Run as ``python tests/wait_peers.py ROLE NAME --runtime-dir DIR [--quick]``. Each role
prints ``READY <pid>`` once its port exists and ``ACCEPTED`` once it has its client, then one
line per event, so tests synchronise on lines.

- ``raiser``: ``serve_requests`` with a handler that raises ``ValueError`` on ``boom`` and
  answers anything else upper-cased; prints ``RAISED`` each time the exception reaches it and
  serves on, until a datagram or a notice (its type is printed) or a quiet ``--read-timeout``.
- ``slow``: for each request prints ``STARTED``, then waits (reading the socket) until the
  request is cancelled (``CANCELLED``) or a ``reply`` line on stdin (answers ``done``:
  ``REPLIED``), for 5 s at most (``UNCANCELLED``); ends at a notice or a quiet read timeout.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def raiser(comm: alpc.CommunicationPort, args: argparse.Namespace) -> None:
    def handler(body: bytes) -> bytes:
        if body == b"boom":
            raise ValueError("boom")
        return body.upper()

    while True:
        try:
            other = comm.serve_requests(handler, timeout=args.read_timeout)
        except ValueError:
            say("RAISED")
            continue
        except (alpc.Timeout, alpc.ConnectionClosed) as exc:
            say("END", type(exc).__name__)
            return
        say(other.type.name)
        return


def slow(comm: alpc.CommunicationPort, args: argparse.Namespace) -> None:
    while True:
        try:
            message = comm.receive(timeout=args.read_timeout)
        except (alpc.Timeout, alpc.ConnectionClosed) as exc:
            say("END", type(exc).__name__)
            return
        if message.type is not alpc.MessageType.REQUEST:
            say(message.type.name)
            return
        say("STARTED")
        end = time.monotonic() + 5.0
        while True:
            if message.cancelled:
                say("CANCELLED")
                break
            left = end - time.monotonic()
            if left <= 0:
                say("UNCANCELLED")
                break
            readable, _, _ = select.select([comm.fileno(), sys.stdin], [], [], left)
            if sys.stdin in readable:
                sys.stdin.readline()
                comm.reply(message, b"done", timeout=5)
                say("REPLIED")
                break
            if readable:
                comm.pump()  # the CANCEL, if one came, flags the message


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["raiser", "slow"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--read-timeout", type=float, default=20.0)
    args = parser.parse_args()
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(quick_lpc=args.quick)
    with alpc.create_port(args.name, attributes, config=config) as port:
        say("READY", os.getpid())
        with port.listen(timeout=20).accept(timeout=20) as comm:
            say("ACCEPTED", comm.quick)
            {"raiser": raiser, "slow": slow}[args.role](comm, args)


if __name__ == "__main__":
    main()

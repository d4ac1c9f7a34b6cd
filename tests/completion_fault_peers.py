"""Client processes for tests/test_completion_faults.py.

Run as ``python tests/completion_fault_peers.py ROLE NAME --runtime-dir DIR``.
Prints ``READY`` once connected, then obeys one stdin line at a time and answers
with one stdout line, so the test decides the order of every step (no sleeps).

Roles:

- ``client``: a blocking client. ``start TAG`` sends request TAG without waiting
  (``STARTED TAG``); ``wait TAG SECONDS`` waits for its reply (``REPLY TAG DATA``,
  ``TIMEOUT TAG``, ``CANCELLED TAG``); ``cancel TAG`` cancels it (``CANCEL TAG True|False``);
  ``ping`` makes a round trip, so the server has read everything sent before (``PONG``);
  ``quit`` closes the port.
- ``lazy``: a blocking client that sends request ``R`` (``SENT R``), then reads nothing
  until stdin ``read``; it then reports every datagram that is not filler
  (``DGRAM DATA``, in arrival order, after ``FILLER COUNT`` for the filler before it)
  until datagram ``END`` (``QUIET`` if nothing comes for ``--quiet`` seconds), then
  whether R got its reply (``REPLY DATA`` / ``NOREPLY``) within ``--quiet`` seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def client(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    pending: dict[str, alpc.PendingRequest] = {}
    with alpc.connect(args.name, config=config, timeout=10) as comm:
        say("READY", os.getpid())
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            command = words[0]
            if command == "start":
                pending[words[1]] = comm.start_request(words[1].encode(), timeout=10)
                say("STARTED", words[1])
            elif command == "wait":
                tag = words[1]
                try:
                    reply = pending[tag].result(timeout=float(words[2]))
                    say("REPLY", tag, reply.data.decode() or "-")
                except alpc.Timeout:
                    say("TIMEOUT", tag)
                except alpc.Cancelled:
                    say("CANCELLED", tag)
            elif command == "cancel":
                say("CANCEL", words[1], pending[words[1]].cancel())
            elif command == "ping":
                comm.ping(timeout=10)
                say("PONG")
            elif command == "quit":
                break
    say("BYE")


def lazy(args: argparse.Namespace) -> None:
    # Takes a pipe fd with a message (the server's reply may carry one).
    config = dataclasses.replace(alpc.Config.from_env(args.runtime_dir), handle_kinds={"pipe"},
                                 max_handles_per_message=1)
    with alpc.connect(args.name, config=config, timeout=10) as comm:
        say("READY", os.getpid())
        pending = comm.start_request(b"R", timeout=10)
        say("SENT R")
        sys.stdin.readline()  # "read": until then this process reads nothing
        filler = 0
        while True:
            try:
                message = comm.receive(timeout=args.quiet)
            except alpc.Timeout:
                say("QUIET")
                break
            except alpc.ConnectionClosed as exc:
                say("GONE", type(exc).__name__)
                break
            if message.type is alpc.MessageType.DATAGRAM:
                if message.data[:1] == b"s":
                    filler += 1
                    continue
                say("FILLER", filler)
                say("DGRAM", message.data.decode())
                if message.data == b"END":
                    break
                continue
            say("OTHER", message.type.name)
        try:
            reply = pending.result(timeout=args.quiet)
            say("REPLY", reply.data.decode())
        except alpc.Timeout:
            say("NOREPLY")
        say("DONE")
        sys.stdin.readline()  # "quit"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["client", "lazy"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--quiet", type=float, default=3.0)
    args = parser.parse_args()
    if args.role == "client":
        client(args)
    else:
        lazy(args)


if __name__ == "__main__":
    main()

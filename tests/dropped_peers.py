"""Peer processes for tests/test_dropped_objects.py and test_dropped_request_message.py
(objects the application drops).

``python tests/dropped_peers.py ROLE NAME --runtime-dir DIR``; each prints one line per
event (tests wait on lines, never sleep).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def connect(args: argparse.Namespace) -> None:
    """Connect once with ``--timeout``: "CONNECTED", or "OUTCOME <error> <seconds>"; then, connected,
    one request per stdin line, each answered "REPLY <data>" or "OUTCOME <error> <seconds>"."""
    config = alpc.Config.from_env(args.runtime_dir)
    say("STARTED", os.getpid())
    started = time.monotonic()
    try:
        comm = alpc.connect(args.name, timeout=args.timeout, config=config)
    except alpc.AlpcError as exc:
        say("OUTCOME", type(exc).__name__, f"{time.monotonic() - started:.1f}")
        return
    with comm:
        say("CONNECTED")
        while line := sys.stdin.readline().strip():
            started = time.monotonic()
            try:
                say("REPLY", comm.request(line.encode(), timeout=args.timeout).data.decode())
            except alpc.AlpcError as exc:
                say("OUTCOME", type(exc).__name__, f"{time.monotonic() - started:.1f}")


def fd_client(args: argparse.Namespace) -> None:
    """Send one request carrying the only read end of a pipe ("SENT"); on each "CHECK" line, say
    whether the server still holds that read end ("OPEN": a write to the pipe succeeds) or not
    ("CLOSED": EPIPE); on "AGAIN", make one more request and print "REPLY <data>"."""
    config = alpc.Config(runtime_dir=Path(args.runtime_dir), handle_kinds=frozenset({alpc.HandleKind.PIPE}))
    with alpc.connect(args.name, config=config, timeout=10) as comm:
        read_end, write_end = os.pipe()
        pending = comm.start_request(b"dropped", fds=[read_end])
        os.close(read_end)
        say("SENT")
        while line := sys.stdin.readline().strip():
            if line == "CHECK":
                try:
                    os.write(write_end, b"x")
                    say("OPEN")
                except BrokenPipeError:
                    say("CLOSED")
            elif line == "AGAIN":
                say("REPLY", comm.request(b"again", timeout=10).data.decode())
        pending.cancel()
        os.close(write_end)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["connect", "fd-client"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    {"connect": connect, "fd-client": fd_client}[args.role](args)


if __name__ == "__main__":
    main()

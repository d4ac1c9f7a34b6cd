"""Peer processes for tests/test_dropped_objects.py (objects the application drops).

``python tests/dropped_peers.py ROLE NAME --runtime-dir DIR``; each prints one line per
event (tests wait on lines, never sleep).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["connect"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    {"connect": connect}[args.role](args)


if __name__ == "__main__":
    main()

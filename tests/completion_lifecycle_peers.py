"""Client processes for tests/test_completion_lifecycle.py.

Run as ``python tests/completion_lifecycle_peers.py NAME --runtime-dir DIR [--connect-timeout S]``.
Connects, then prints ``CONNECTED PID`` or ``REFUSED ERROR`` (and exits), then obeys one
stdin line at a time with one stdout line, so the test orders every step (no sleeps):
``start TAG`` sends request TAG without waiting (``STARTED TAG``); ``wait TAG SECONDS``
waits for its reply (``REPLY TAG DATA`` with ``-`` for empty, or ``ERROR TAG NAME``);
``ping`` makes a round trip, so the server has read everything sent before (``PONG``);
``quit`` closes the port (``BYE``).
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    args = parser.parse_args()
    config = alpc.Config.from_env(args.runtime_dir)
    try:
        comm = alpc.connect(args.name, config=config, timeout=args.connect_timeout)
    except alpc.AlpcError as exc:
        say("REFUSED", type(exc).__name__)
        return
    pending: dict[str, alpc.PendingRequest] = {}
    with comm:
        say("CONNECTED", os.getpid())
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "start":
                pending[words[1]] = comm.start_request(words[1].encode(), timeout=30)
                say("STARTED", words[1])
            elif words[0] == "wait":
                try:
                    reply = pending[words[1]].result(timeout=float(words[2]))
                    say("REPLY", words[1], reply.data.decode() or "-")
                except alpc.AlpcError as exc:
                    say("ERROR", words[1], type(exc).__name__)
            elif words[0] == "ping":
                comm.ping(timeout=10)
                say("PONG")
            elif words[0] == "quit":
                break
    say("BYE")


if __name__ == "__main__":
    main()

"""A client process for the stats tests: it runs commands read from stdin, one a line.

``python tests/stats_client_peers.py NAME --runtime-dir DIR`` connects to NAME, prints
``READY <pid> <quick>`` and then, per line: ``call N`` (N requests of 3 bytes, ``CALLED
N``), ``send TEXT`` (a datagram, ``SENT``), ``close`` (``CLOSED``, then exits).
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
    args = parser.parse_args()
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.connect(args.name, config=config, timeout=10) as comm:
        say("READY", os.getpid(), int(comm.quick))
        for line in sys.stdin:
            command, _, rest = line.strip().partition(" ")
            if command == "call":
                for _ in range(int(rest)):
                    assert comm.call(b"abc", timeout=10) == b"ABC"
                say("CALLED", rest)
            elif command == "send":
                comm.send(rest.encode(), timeout=10)
                say("SENT")
            elif command == "close":
                break
    say("CLOSED")


if __name__ == "__main__":
    main()

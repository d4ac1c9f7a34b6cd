"""Client processes for the cancel and deadline tests (test_completion_saturated_cancel.py and others).

Run as ``python tests/cancel_client_peers.py client NAME --runtime-dir DIR``. Prints ``READY``
once connected, then obeys one stdin line at a time and answers with one stdout line, so the
test decides the order of every step (no sleeps):

- ``start TAG [SECONDS]`` sends request TAG without waiting, with a deadline SECONDS from now
  if given (``STARTED TAG DEADLINE``, the deadline a ``time.monotonic()`` value or ``-``);
- ``cancel TAG`` cancels it (``CANCEL TAG True|False``);
- ``ping`` makes a round trip, so every frame sent before has been read by the server (``PONG``);
- ``wait TAG SECONDS`` waits for its reply (``REPLY TAG DATA``, ``DEADLINE TAG``, ``TIMEOUT TAG``,
  ``CANCELLED TAG`` or ``ERROR TAG TYPE``);
- ``quit`` closes the port (``BYE``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def wait(pending: alpc.PendingRequest, tag: str, seconds: float) -> None:
    try:
        say("REPLY", tag, pending.result(timeout=seconds).data.decode() or "-")
    except alpc.DeadlineExceeded:
        say("DEADLINE", tag)
    except alpc.Timeout:
        say("TIMEOUT", tag)
    except alpc.Cancelled:
        say("CANCELLED", tag)
    except alpc.AlpcError as exc:
        say("ERROR", tag, type(exc).__name__)


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
                deadline = time.monotonic() + float(words[2]) if len(words) > 2 else None
                pending[words[1]] = comm.start_request(words[1].encode(), timeout=10, deadline=deadline)
                say("STARTED", words[1], "-" if deadline is None else repr(deadline))
            elif command == "cancel":
                say("CANCEL", words[1], pending[words[1]].cancel())
            elif command == "ping":
                comm.ping(timeout=10)
                say("PONG")
            elif command == "wait":
                wait(pending.pop(words[1]), words[1], float(words[2]))
            elif command == "quit":
                break
    say("BYE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["client"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    client(parser.parse_args())


if __name__ == "__main__":
    main()

"""Hostile peers for tests/hostile/test_hostile_fd_parking.py.

Run as ``python tests/hostile/fd_parking_peers.py ROLE NAME --runtime-dir DIR``; prints
``READY`` once set up and one line per event, so tests synchronise on lines.

- ``dribble-server``: a port whose server, asked to connect, answers with the
  first byte of a CONNECTION_REPLY header and a pipe fd attached, then never
  finishes the frame (it says ``DRIBBLED``, then waits for stdin to close).
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc
from alpc.wire import MessageType, encode_header


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(str(part) for part in parts) + "\n")
    sys.stdout.flush()


def dribble_server(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, config=config) as port:
        say("READY", os.getpid())
        request = port.listen(timeout=30)
        stream = request._take_stream()
        read_end, write_end = os.pipe()
        try:
            header = encode_header(MessageType.CONNECTION_REPLY, 16, n_fds=1)
            stream.send([header[:1]], [read_end])
            say("DRIBBLED")
            sys.stdin.readline()
        finally:
            os.close(read_end)
            os.close(write_end)
            stream.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["dribble-server"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    args = parser.parse_args()
    dribble_server(args)


if __name__ == "__main__":
    main()

"""Real peer processes for the signal tests (tests/test_signal_waits.py).

Run as ``python tests/signal_peers.py ROLE NAME --runtime-dir DIR``. Each role prints
``READY ...`` once set up, then one line per event, so tests synchronise on lines.

- ``server``: a port with a large inline threshold (a big datagram is one frame on the
  socket); it accepts one client, then reads nothing until a ``read`` line on stdin, and then
  prints each message (``DATAGRAM <length> <first bytes>``, or the notice's type) until a read
  times out (``TIMEOUT``) or a notice ends the connection.
- ``client``: connects and prints ``READY <pid> QUICK <bool>``, then for each ``call X`` line
  on stdin calls X (20 s timeout), printing ``RESULT <body>`` or ``ERROR <exception type>``.
- ``caller``: connects, prints ``READY <pid>``, and on a ``go`` line sends one request
  (30 s timeout), printing ``REPLY <body>`` or ``ERROR <exception type>``.
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc

INLINE = 4 * 1024 * 1024


def say(*parts: object) -> None:
    print(*parts, flush=True)


def server(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(inline_threshold=INLINE, max_message_length=2 * INLINE)
    with alpc.create_port(args.name, attributes, config=config) as port:
        say("READY", os.getpid())
        comm = port.listen(timeout=20).accept(timeout=20)
        say("ACCEPTED", comm.peer.pid)
        for line in sys.stdin:
            if line.strip() == "read":
                break
        while True:
            try:
                message = comm.receive(timeout=args.read_timeout)
            except alpc.Timeout:
                say("TIMEOUT")
                break
            except alpc.ConnectionClosed as exc:
                say("CLOSED", type(exc).__name__)
                break
            if message.type is alpc.MessageType.DATAGRAM:
                say("DATAGRAM", len(message.data), message.data[:8].decode(errors="replace") or "-")
            else:
                say(message.type.name)
                break
        comm.close()


def client(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    comm = alpc.connect(args.name, config=config, timeout=20)
    say("READY", os.getpid(), "QUICK", comm.quick)
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command == "call":
            try:
                say("RESULT", comm.call(rest.encode(), timeout=20).decode())
            except alpc.AlpcError as exc:
                say("ERROR", type(exc).__name__)
    comm.close()


def caller(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.connect(args.name, config=config, timeout=20) as comm:
        say("READY", os.getpid())
        for line in sys.stdin:
            if line.strip() == "go":
                break
        try:
            say("REPLY", comm.request(b"work", timeout=30).data.decode())
        except alpc.AlpcError as exc:
            say("ERROR", type(exc).__name__)
        sys.stdin.read()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client", "caller"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--read-timeout", type=float, default=3.0)
    args = parser.parse_args()
    {"server": server, "client": client, "caller": caller}[args.role](args)


if __name__ == "__main__":
    main()

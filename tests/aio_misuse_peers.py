"""Real peer processes for the asyncio third-pass tests (test_aio_*).

Run as ``python tests/aio_misuse_peers.py ROLE NAME --runtime-dir DIR [options]``. Each
prints ``READY`` once its port exists and one line per event after: tests wait on lines.
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def deaf(args: argparse.Namespace) -> None:
    """Accept one client and read nothing from it until a stdin line comes; then drain and close."""
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(max_queued_datagrams=args.datagrams, inline_threshold=args.inline,
                                     section_size=args.section, max_section_bytes=args.section)
    with alpc.create_port(args.name, attributes, config=config) as port:
        say("READY", os.getpid())
        with port.listen(timeout=30).accept():
            say("ACCEPTED")
            sys.stdin.readline()


def echo(args: argparse.Namespace) -> None:
    """Answer every request with its data upper-cased; print each request's data, each datagram's
    length and first bytes; ``--clients`` clients, one after the other."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, config=config) as port:
        say("READY", os.getpid())
        for _ in range(args.clients):
            with port.listen(timeout=30).accept() as comm:
                say("ACCEPTED")
                while True:
                    message = comm.receive(timeout=30)
                    if message.type in (alpc.MessageType.PORT_CLOSED, alpc.MessageType.CLIENT_DIED):
                        break
                    if message.type is alpc.MessageType.REQUEST:
                        say("REQUEST", bytes(message.data).decode())
                        message.reply(bytes(message.data).upper())
                    else:
                        say("DATAGRAM", len(message.data), bytes(message.data[:16]).hex() or "-")


def client(args: argparse.Namespace) -> None:
    """Connect with ``--data``, say how it went (CONNECTED / REJECTED / FAILED), ask "hello"."""
    config = alpc.Config.from_env(args.runtime_dir)
    try:
        comm = alpc.connect(args.name, args.data.encode(), config=config, timeout=10)
    except alpc.ConnectionRejected as exc:
        say("REJECTED", exc.reason)
        return
    except alpc.AlpcError as exc:
        say("FAILED", type(exc).__name__)
        return
    with comm:
        say("CONNECTED")
        say("REPLY", bytes(comm.request(b"hello", timeout=10).data).decode())


def pusher(args: argparse.Namespace) -> None:
    """Connect, send ``--count`` datagrams "0".."N-1", close (PORT_CLOSED), say DONE; with
    ``--wait``, say CONNECTED and wait for a stdin line before sending."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.connect(args.name, config=config, timeout=10) as comm:
        if args.wait:
            say("CONNECTED")
            sys.stdin.readline()
        for i in range(args.count):
            comm.send(str(i).encode(), timeout=10)
    say("DONE")


def canceller(args: argparse.Namespace) -> None:
    """Send request "x"; on a stdin line cancel it, send datagram "after" (behind the CANCEL on
    the socket), say CANCELLED; on the next line close."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.connect(args.name, config=config, timeout=10) as comm:
        pending = comm.start_request(b"x")
        say("SENT")
        sys.stdin.readline()
        pending.cancel()
        comm.send(b"after", timeout=10)
        say("CANCELLED")
        sys.stdin.readline()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--datagrams", type=int, default=1024)
    parser.add_argument("--inline", type=int, default=256)
    parser.add_argument("--section", type=int, default=4096)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--data", default="")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--wait", action="store_true")
    args = parser.parse_args()
    {"deaf": deaf, "echo": echo, "client": client, "pusher": pusher, "canceller": canceller}[args.role](args)


if __name__ == "__main__":
    main()

"""Real peer processes for the end-to-end tests.

Run as ``python tests/peers.py ROLE ...``. Each role prints ``READY ...`` once it
is set up and then reports what it sees as one line per event on stdout, so the
tests synchronise on those lines instead of sleeping.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def serve(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(max_message_length=args.max_message_length,
                                     max_connections=args.max_connections)
    with alpc.create_port(args.name, attributes, config=config) as port:
        say("READY", os.getpid())
        held: list[alpc.ConnectionRequest] = []
        while True:
            event = port.wait(timeout=args.timeout)
            if isinstance(event, alpc.ConnectionRequest):
                if args.hold:
                    held.append(event)
                    say("HOLDING", event.client.pid)
                elif args.reject:
                    event.reject(args.reject)
                    say("REJECTED", event.client.pid)
                else:
                    event.accept(data=b"welcome " + event.data)
                    say("ACCEPTED", event.client.pid, event.client.uid, event.client.gid)
                continue
            handle_message(event)


def handle_message(message: alpc.Message) -> None:
    kind = message.type
    if kind is alpc.MessageType.REQUEST:
        if message.data == b"noreply":
            say("NOREPLY", message.id)
        elif message.data.startswith(b"push:"):
            message.port.send(message.data[5:])
            message.reply(b"pushed")
        elif message.data.startswith(b"exit"):
            say("EXITING")
            os._exit(0)
        else:
            message.reply(message.data.upper())
    elif kind is alpc.MessageType.DATAGRAM:
        say("DATAGRAM", message.data.decode(errors="replace"))
    else:
        say(kind.name, message.sender.pid, message.reason.replace(" ", "_"))


def client(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    comm = alpc.connect(args.name, data=args.data.encode(), timeout=args.timeout, config=config)
    say("READY", os.getpid(), comm.server.pid, comm.accept_data.decode())
    if args.fork_child:
        child = os.fork()
        if child == 0:
            # Holds the inherited socket until the test closes stdin.
            sys.stdin.read()
            os._exit(0)
        say("CHILD", child)
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        try:
            if command == "request":
                say("REPLY", comm.request(rest.encode(), timeout=args.timeout).data.decode())
            elif command == "send":
                comm.send(rest.encode())
                say("SENT")
            elif command == "receive":
                say("RECEIVED", comm.receive(timeout=args.timeout).data.decode())
            elif command == "close":
                comm.close()
                say("CLOSED")
            elif command == "pending":
                waiter = threading.Thread(target=pending_request, args=(comm, rest, args.timeout))
                waiter.start()
        except alpc.AlpcError as exc:
            say("ERROR", type(exc).__name__, str(exc).replace(" ", "_"))


def pending_request(comm: alpc.CommunicationPort, text: str, timeout: float) -> None:
    say("WAITING")
    try:
        comm.request(text.encode(), timeout=timeout)
        say("REPLY")
    except alpc.AlpcError as exc:
        say("ERROR", type(exc).__name__)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--reject", default="")
    parser.add_argument("--data", default="hello")
    parser.add_argument("--max-message-length", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--fork-child", action="store_true")
    parser.add_argument("--max-connections", type=int, default=4096)
    parser.add_argument("--hold", action="store_true", help="never answer connection requests")
    args = parser.parse_args()
    serve(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    main()

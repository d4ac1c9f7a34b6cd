"""Real peer processes for the section, view and grant tests.

Run as ``python tests/section_peers.py ROLE ...``. Every role prints ``READY ...``
once set up and one line per event, so tests synchronise on lines, never sleeps.

- ``server NAME``: accepts every client; answers requests (see ``handle``);
  with ``--hold-views`` keeps received views until stdin says ``release``.
- ``streamer NAME``: a client sending large datagrams until it is killed (or ``--count`` sent).
- ``named-create SIZE`` / ``named-open NAME``: a named section and a third
  process that opens it by name.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading

import alpc

PATTERN = bytes(range(256))
_SAY = threading.Lock()


def say(*parts: object) -> None:
    """One whole line per event: two threads print here, and print() is not atomic."""
    line = " ".join(map(str, parts)) + "\n"
    with _SAY:
        sys.stdout.write(line)
        sys.stdout.flush()


def pattern(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def digest(data: object) -> str:
    return hashlib.sha256(data).hexdigest()  # type: ignore[arg-type]


def become(uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def attributes(args: argparse.Namespace) -> alpc.PortAttributes:
    return alpc.PortAttributes(
        max_message_length=args.max_message_length, inline_threshold=args.inline_threshold,
        section_size=args.section_size, max_section_bytes=args.max_section_bytes,
        secure_views=args.secure_views, section_backend=args.section_backend,
        allow_unsealed_sections=args.allow_unsealed, direct_memory=not args.no_direct_memory,
        # A server that dropped to another uid still serves the root test process.
        acl=alpc.PortAcl(allow_root=True),
    )


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.held: list[alpc.View] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        config = alpc.Config.from_env(self.args.runtime_dir)
        with alpc.create_port(self.args.name, attributes(self.args), config=config,
                              report_interval=self.args.report_interval) as port:
            threading.Thread(target=self.commands, daemon=True).start()
            say("READY", os.getpid(), os.getuid())
            while True:
                event = port.wait(timeout=self.args.timeout)
                if isinstance(event, alpc.ConnectionRequest):
                    event.accept()
                    say("ACCEPTED", event.client.pid)
                elif event.type is alpc.MessageType.REQUEST:
                    try:
                        self.handle(event)
                    except alpc.ConnectionClosed as exc:  # the client left before the answer
                        say("UNANSWERED", event.sender.pid, type(exc).__name__)
                elif event.type is alpc.MessageType.DATAGRAM:
                    say("DATAGRAM", len(event.data), digest(event.data))
                else:
                    say(event.type.name, event.sender.pid, event.reason.replace(" ", "_"))

    def commands(self) -> None:
        for line in sys.stdin:
            if line.strip() == "release":
                with self.lock:
                    held, self.held = self.held, []
                for view in held:
                    view.release()
                say("RELEASED", len(held))

    def handle(self, message: alpc.Message) -> None:
        if message.view is not None:
            self.handle_view(message, message.view)
            return
        data = message.data
        if not data.startswith(b"cmd:"):
            message.reply(f"sha:{digest(data)}:{len(data)}".encode())
            return
        verb, _, rest = data[4:].decode().partition(":")
        comm = message.port
        if verb == "big":
            message.reply(pattern(int(rest)))
        elif verb == "secure":
            message.reply(pattern(int(rest)), secure=True)
        elif verb == "view":
            view = comm.create_view(int(rest), timeout=10)
            view.memory[:] = pattern(int(rest))
            message.reply(view)
        elif verb == "push":
            comm.send(pattern(int(rest)))
            message.reply(b"pushed")
        elif verb == "grant-read":
            grant = message.grant
            body = grant.read(timeout=10)
            message.reply(f"sha:{digest(body)}:{len(body)}:direct={grant.direct}".encode())
        elif verb == "grant-write":
            grant = message.grant
            grant.write(pattern(int(rest)), timeout=10)
            message.reply(f"wrote:direct={grant.direct}".encode())
        else:
            message.reply(b"unknown command")

    def handle_view(self, message: alpc.Message, view: alpc.View) -> None:
        try:
            view.memory[0] = 0
            writable = True
        except TypeError:
            writable = False
        text = f"view:{digest(view.memory)}:{len(view)}:writable={writable}:secure={view.secure}"
        if self.args.hold_views:
            with self.lock:
                self.held.append(view)
            say("HOLDING", len(self.held))
        else:
            view.release()
        message.reply(text.encode())


def client_config(args: argparse.Namespace) -> alpc.Config:
    return alpc.Config(runtime_dir=alpc.Config.from_env(args.runtime_dir).runtime_dir,
                       section_backend=args.section_backend, allow_unsealed_sections=args.allow_unsealed,
                       section_size=args.section_size, max_section_bytes=args.max_section_bytes)


def streamer(args: argparse.Namespace) -> None:
    comm = alpc.connect(args.name, config=client_config(args), timeout=10)
    if args.leave_name:
        # What a SIGKILL between shm_open and shm_unlink would leave behind.
        say("LEFT", alpc.Section.create(4096, backend="posix", named=True).name)
    say("READY", os.getpid())
    payload = pattern(args.size)
    announced = False
    for _ in range(args.count) if args.count else iter(int, 1):
        if args.view:
            view = comm.create_view(args.size, timeout=30)
            view.memory[:] = payload
            comm.send(view, timeout=30)
        else:
            comm.send(payload, timeout=30)
        if not announced:
            say("SENDING")
            announced = True
    say("SENT", args.count)
    sys.stdin.readline()
    comm.close()


def named_create(args: argparse.Namespace) -> None:
    section = alpc.Section.create(int(args.name), backend="posix", named=True)
    view = section.view()
    view.memory[:8] = b"alpcname"
    view.release()
    say("NAME", section.name)
    for line in sys.stdin:
        if line.strip() == "unlink":
            section.unlink()
            say("UNLINKED")
    section.close()


def named_open(args: argparse.Namespace) -> None:
    section = alpc.Section.open(args.name)
    with section.view(0, 8) as memory:
        say("OPENED", bytes(memory).decode(), section.size)
    sys.stdin.read()
    with section.view(0, 8) as memory:
        say("STILL", bytes(memory).decode())
    section.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "streamer", "named-create", "named-open"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", default="")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--as-user", type=int, default=None)
    parser.add_argument("--max-message-length", type=int, default=1 << 30)
    parser.add_argument("--inline-threshold", type=int, default=256)
    parser.add_argument("--section-size", type=int, default=2 << 20)
    parser.add_argument("--max-section-bytes", type=int, default=2 << 30)
    parser.add_argument("--section-backend", default="memfd")
    parser.add_argument("--allow-unsealed", action="store_true")
    parser.add_argument("--secure-views", action="store_true")
    parser.add_argument("--no-direct-memory", action="store_true")
    parser.add_argument("--hold-views", action="store_true")
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--view", action="store_true")
    parser.add_argument("--count", type=int, default=0, help="streamer: stop after this many (0: until killed)")
    parser.add_argument("--leave-name", action="store_true")
    parser.add_argument("--report-interval", type=float, default=1.0, help="figures sent to the broker (alpc peers)")
    args = parser.parse_args()
    become(args.as_user)
    if args.role == "server":
        Server(args).run()
    elif args.role == "streamer":
        streamer(args)
    elif args.role == "named-create":
        named_create(args)
    else:
        named_open(args)


if __name__ == "__main__":
    main()

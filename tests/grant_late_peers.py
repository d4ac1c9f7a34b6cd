"""Peer processes for tests/test_grant_given_up and test_receive_behind_blocked_send.py.

``python tests/grant_late_peers.py late-writer NAME --runtime-dir DIR``: a server that takes
one granted request, says ``GOT``, then waits (reading nothing from the client meanwhile, so a
CANCEL stays unread in its socket) for the line ``go`` on stdin, writes 16 bytes 0xEE at offset 0
of the grant, says ``WROTE ok:<direct>`` or ``WROTE error:<type>``, replies, and keeps serving
(pings) until its client goes.

``python tests/grant_late_peers.py racing-writer NAME --runtime-dir DIR``: a server that takes
one granted request and starts writing 16 bytes 0xEE at offset 0 of the grant; once the runtime
has checked the grant and is about to write the client's memory it says ``CHECKED`` and waits for
``go`` on stdin, while another thread keeps reading the connection (so it sees the client's
CANCEL and answers it, and answers pings). Then it says ``WROTE ok:<direct>`` or
``WROTE error:<type>``.

``python tests/grant_late_peers.py deaf-sender NAME --runtime-dir DIR --count N``: a server
(inline threshold 64 KiB) that accepts one client, sends it N datagrams ``x``, says ``SENT``,
then reads nothing until a line on stdin.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import alpc


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(map(str, parts)) + "\n")
    sys.stdout.flush()


def late_writer(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, alpc.PortAttributes(), config=config) as port:
        say("READY", os.getpid())
        while True:
            event = port.wait(timeout=60)
            if isinstance(event, alpc.ConnectionRequest):
                event.accept()
                continue
            if event.type is not alpc.MessageType.REQUEST:
                say(event.type.name)
                if event.type in (alpc.MessageType.PORT_CLOSED, alpc.MessageType.CLIENT_DIED):
                    return
                continue
            say("GOT")
            if sys.stdin.readline().strip() != "go":
                return
            try:
                event.grant.write(b"\xee" * 16, offset=0, timeout=5)
                answer = f"ok:{event.grant.direct}"
            except Exception as exc:  # what the server's application sees
                answer = f"error:{type(exc).__name__}"
            say("WROTE", answer)
            try:
                event.reply(answer.encode(), timeout=5)
            except (alpc.AlpcError, ValueError) as exc:
                say("REPLY-FAILED", type(exc).__name__)


def racing_writer(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    real_write = alpc.port.direct_write

    def paused_write(*call: object) -> bool:
        say("CHECKED")
        if sys.stdin.readline().strip() != "go":
            os._exit(0)
        return real_write(*call)  # type: ignore[arg-type]

    alpc.port.direct_write = paused_write  # type: ignore[assignment]
    with alpc.create_port(args.name, alpc.PortAttributes(), config=config) as port:
        say("READY", os.getpid())
        event = port.wait(timeout=60)
        assert isinstance(event, alpc.ConnectionRequest)
        event.accept()
        event = port.wait(timeout=60)
        assert isinstance(event, alpc.Message) and event.type is alpc.MessageType.REQUEST, event

        def read_on() -> None:
            try:
                while port.wait(timeout=60).type not in (alpc.MessageType.PORT_CLOSED, alpc.MessageType.CLIENT_DIED):
                    pass
            except alpc.AlpcError:
                pass

        threading.Thread(target=read_on, daemon=True).start()
        try:
            event.grant.write(b"\xee" * 16, offset=0, timeout=5)
            answer = f"ok:{event.grant.direct}"
        except Exception as exc:  # what the server's application sees
            answer = f"error:{type(exc).__name__}"
        say("WROTE", answer)
        sys.stdin.readline()


def deaf_sender(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, alpc.PortAttributes(inline_threshold=65536), config=config) as port:
        say("READY", os.getpid())
        event = port.wait(timeout=60)
        assert isinstance(event, alpc.ConnectionRequest)
        comm = event.accept()
        comm.send_many([b"x"] * args.count, timeout=10)  # one write: many small ones fill the socket
        say("SENT")
        sys.stdin.readline()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["late-writer", "racing-writer", "deaf-sender"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args()
    {"late-writer": late_writer, "racing-writer": racing_writer, "deaf-sender": deaf_sender}[args.role](args)


if __name__ == "__main__":
    main()

"""Peer processes for tests/test_section_faults.py.

``python tests/grant_peers.py grant-server NAME --runtime-dir DIR``:
a server whose requests name an operation on the request's grant:

- ``write-at:OFFSET:N`` writes N bytes 0xEE at OFFSET of the grant;
- ``read-at:OFFSET:N`` reads N bytes at OFFSET and answers them.

It answers ``ok:<direct>:<hex>`` or ``error:<ExceptionType>``.

``python tests/grant_peers.py flood-server NAME --runtime-dir DIR --kind read|write --count N``:
accepts one client, takes its granted request, then writes N raw GRANT_READ (range [0, +16)) or
inline GRANT_WRITE (16 bytes 0xEE at [0, +16)) frames for it back to back, without waiting for
any answer, then a datagram ``done`` and the reply ``bye``; says ``FLOODED``.
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc
from alpc.wire import Attributes, MessageType, Range, encode_attributes


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(map(str, parts)) + "\n")
    sys.stdout.flush()


def grant_server(args: argparse.Namespace) -> None:
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
                continue
            verb, offset, count = event.data.decode().split(":")
            try:
                if verb == "write-at":
                    event.grant.write(b"\xee" * int(count), offset=int(offset), timeout=5)
                    answer = f"ok:{event.grant.direct}:"
                else:
                    got = event.grant.read(int(offset), int(count), timeout=5)
                    answer = f"ok:{event.grant.direct}:{got.hex()}"
            except Exception as exc:  # what the server's application sees
                answer = f"error:{type(exc).__name__}"
            event.reply(answer.encode())


def fork_grant(args: argparse.Namespace) -> None:
    """Connect, then fork: the child (sharing the connection) asks the server to write 16
    bytes into a buffer it grants. Each process then says what its own copy of the buffer holds."""
    config = alpc.Config.from_env(args.runtime_dir)
    buffer = bytearray(b"\x11" * 64)  # at the same address in parent and child
    comm = alpc.connect(args.name, config=config, timeout=10)
    say("READY", os.getpid())
    child = os.fork()
    if child == 0:
        try:
            reply = comm.request(b"write-at:0:16", grant=alpc.MemoryGrant(buffer, read=False, write=True),
                                 timeout=10).data.decode()
            say("CHILD", reply, buffer[:16].hex())
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    say("PARENT", buffer[:16].hex())
    comm.close()


def flood_server(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, alpc.PortAttributes(direct_memory=False), config=config) as port:
        say("READY", os.getpid())
        comm = port.listen(timeout=30).accept()
        request = comm.receive(timeout=30)
        assert request.type is MessageType.REQUEST and request.grant is not None, request
        channel = comm._core.channel
        attrs = encode_attributes(Attributes(range=Range(0, 16)))
        if args.kind == "read":
            frames = channel._frame(MessageType.GRANT_READ, b"", callback_id=request.id, attrs=attrs)
        else:
            frames = channel._frame(MessageType.GRANT_WRITE, b"\xee" * 16, callback_id=request.id, attrs=attrs)
        # One buffer for the lot; the client reads it as it comes.
        comm._stream.send([b"".join(frames) * args.count], deadline=None)
        comm.send(b"done", timeout=30)
        comm.reply(request, b"bye", timeout=30)
        say("FLOODED")
        try:
            while True:
                event = comm.receive(timeout=30)
                if event.type in (MessageType.PORT_CLOSED, MessageType.CLIENT_DIED):
                    break
        except alpc.ConnectionClosed:
            pass
        comm.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["grant-server", "fork-grant", "flood-server"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--kind", choices=["read", "write"], default="read")
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    {"grant-server": grant_server, "fork-grant": fork_grant, "flood-server": flood_server}[args.role](args)


if __name__ == "__main__":
    main()

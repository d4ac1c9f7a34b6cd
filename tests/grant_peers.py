"""Peer processes for tests/test_section_faults.py.

``python tests/grant_peers.py grant-server NAME --runtime-dir DIR``:
a server whose requests name an operation on the request's grant:

- ``write-at:OFFSET:N`` writes N bytes 0xEE at OFFSET of the grant;
- ``read-at:OFFSET:N`` reads N bytes at OFFSET and answers them.

It answers ``ok:<direct>:<hex>`` or ``error:<ExceptionType>``.
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["grant-server", "fork-grant"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    args = parser.parse_args()
    if args.role == "grant-server":
        grant_server(args)
    else:
        fork_grant(args)


if __name__ == "__main__":
    main()

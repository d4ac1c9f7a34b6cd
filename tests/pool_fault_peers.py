"""Server processes for tests/test_pool_faults.py.

``python tests/pool_fault_peers.py ROLE NAME --runtime-dir DIR``; each prints ``READY`` once
its port exists and one line per event after (tests wait on lines).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def mapped(comm: alpc.CommunicationPort) -> int:
    """How many of the client's sections this side still maps."""
    sections = comm._channel.sections  # type: ignore[attr-defined]
    return len(sections.peer._sections) if sections is not None else 0


def trim(args: argparse.Namespace) -> None:
    """One client. Requests: "hold" is answered, then nothing is read until a stdin line;
    "count" is answered with how many of the client's sections this side maps; any other
    body is copied out and answered "ok". Datagrams are read and dropped."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, config=config) as port:
        say("READY", os.getpid())
        comm = port.listen(timeout=30).accept()
        while True:
            message = comm.receive(timeout=30)
            if message.type is alpc.MessageType.DATAGRAM:
                continue
            if message.type is not alpc.MessageType.REQUEST:
                say("END", message.type.name)
                return
            body = message.data
            if body == b"hold":
                message.reply(b"held")
                say("HOLDING")
                sys.stdin.readline()
            elif body == b"count":
                message.reply(str(mapped(comm)).encode())
            else:
                message.reply(b"ok")


def fds(args: argparse.Namespace) -> None:
    """One client. Request "pipe" is answered with the read end of a new pipe (its inode
    printed as "PIPE <inode>" first); any other request is answered "ok"."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, config=config) as port:
        say("READY", os.getpid())
        comm = port.listen(timeout=30).accept()
        while True:
            message = comm.receive(timeout=30)
            if message.type is not alpc.MessageType.REQUEST:
                say("END", message.type.name)
                return
            if message.data == b"pipe":
                read_end, write_end = os.pipe()
                say("PIPE", os.fstat(read_end).st_ino)
                message.reply(b"pipe", fds=[read_end])
                os.close(read_end)
                os.close(write_end)
            else:
                message.reply(b"ok")


def budget(args: argparse.Namespace) -> None:
    """Two clients on a port whose section budget holds one 4 MiB section. Request "big" is
    answered with 3 MiB (through a section), or "throttled" when no space came within 2 s;
    any other request is answered "ok"."""
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(section_size=1 << 20, max_port_section_bytes=4 << 20)
    with alpc.create_port(args.name, attributes, config=config) as port:
        say("READY", os.getpid())
        comms = [port.listen(timeout=30).accept() for _ in range(2)]
        say("ACCEPTED")
        threads = [threading.Thread(target=_serve_big, args=(comm,)) for comm in comms]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def _serve_big(comm: alpc.CommunicationPort) -> None:
    while True:
        message = comm.receive(timeout=30)
        if message.type is not alpc.MessageType.REQUEST:
            return
        if message.data != b"big":
            message.reply(b"ok")
            continue
        try:
            message.reply(b"B" * (3 << 20), timeout=2)
        except alpc.Throttled:
            say("THROTTLED")
            message.reply(b"throttled")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["trim", "fds", "budget"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    args = parser.parse_args()
    {"trim": trim, "fds": fds, "budget": budget}[args.role](args)


if __name__ == "__main__":
    main()

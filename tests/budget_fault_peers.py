"""Server processes for tests/test_budget_faults.py: one port whose section budget
(max_port_section_bytes) is shared by connections served by the asyncio driver, the
blocking driver, or both.

``python tests/budget_fault_peers.py DRIVERS NAME --runtime-dir DIR [--budget-mib N]
[--reply-timeout S]``: DRIVERS has one letter per client, in accept order: ``a`` serves that
connection with alpc.aio, ``b`` with the blocking driver (on a thread). Prints ``READY``
once the port exists, ``ACCEPTED`` once every client is, then one line per event.

Requests: "big" is answered with 3 MiB (through a section, one 4 MiB pooled section) within
``--reply-timeout`` ("REPLIED <index> <seconds>"), or "THROTTLED <index> <limit> <message>"
when that reply raised Throttled (then "throttled" is answered if the connection lives);
any other request is answered "ok". Datagram "fill" (blocking connections only) fills
the server's socket to that client ("FULL <index>"): the client reads nothing more.
A notice prints "NOTICE <index> <reason>" and ends that connection's serving.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import threading
import time

import alpc
from alpc import aio

MIB = 1 << 20
BIG = b"B" * (3 * MIB)


def say(*parts: object) -> None:
    print(*parts, flush=True)


def _big_reply(index: int, message: alpc.Message, reply_timeout: float) -> bool:
    """The blocking driver's "big": True when it went out."""
    started = time.monotonic()
    try:
        message.reply(BIG, timeout=reply_timeout)
    except alpc.Throttled as exc:
        say("THROTTLED", index, exc.limit, str(exc).replace("\n", " "))
        return False
    say("REPLIED", index, f"{time.monotonic() - started:.3f}")
    return True


def _fill(index: int, comm: alpc.CommunicationPort) -> None:
    """Small datagrams to the client until one cannot be written at all."""
    comm._stream._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[attr-defined]
    try:
        for _ in range(20000):
            comm.send(b"x" * 200, timeout=0.2)
    except alpc.Throttled:
        say("WINDOW", index)  # the datagram window closed first: the test cannot go on
        return
    except alpc.Timeout:
        pass
    say("FULL", index, "closed" if comm.closed else "open")


def serve_blocking(index: int, comm: alpc.CommunicationPort, reply_timeout: float) -> None:
    while True:
        try:
            message = comm.receive(timeout=60)
        except alpc.ConnectionClosed:
            return
        if message.type in (alpc.MessageType.PORT_CLOSED, alpc.MessageType.CLIENT_DIED):
            say("NOTICE", index, message.reason)
            return
        if message.type is alpc.MessageType.DATAGRAM:
            if message.data == b"fill":
                _fill(index, comm)
            continue
        try:
            if message.data != b"big":
                message.reply(b"ok")
            elif not _big_reply(index, message, reply_timeout):
                message.reply(b"throttled")
        except alpc.ConnectionClosed:
            continue  # the notice comes next


async def serve_async(index: int, comm: aio.AsyncCommunicationPort, reply_timeout: float) -> None:
    while True:
        try:
            message = await comm.receive(timeout=60)
        except alpc.ConnectionClosed:
            return
        if message.type in (alpc.MessageType.PORT_CLOSED, alpc.MessageType.CLIENT_DIED):
            say("NOTICE", index, message.reason)
            await comm.close()
            return
        if message.type is alpc.MessageType.DATAGRAM:
            continue
        try:
            if message.data != b"big":
                await comm.reply(message, b"ok")
                continue
            started = time.monotonic()
            try:
                await comm.reply(message, BIG, timeout=reply_timeout)
            except alpc.Throttled as exc:
                say("THROTTLED", index, exc.limit, str(exc).replace("\n", " "))
                await comm.reply(message, b"throttled")
            else:
                say("REPLIED", index, f"{time.monotonic() - started:.3f}")
        except alpc.ConnectionClosed:
            continue  # the notice comes next


async def main_async(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(section_size=MIB, max_port_section_bytes=args.budget_mib * MIB)
    port = await aio.create_port(args.name, attributes, config=config)
    loop = asyncio.get_running_loop()
    say("READY", os.getpid())
    tasks: list[asyncio.Task[None]] = []
    threads: list[threading.Thread] = []
    try:
        for index, driver in enumerate(args.drivers):
            request = await port.listen(timeout=30)
            if driver == "a":
                comm = await request.accept()
                tasks.append(asyncio.create_task(serve_async(index, comm, args.reply_timeout)))
            else:
                # The blocking driver on the same port: the request's own accept adopts it there.
                blocking = await loop.run_in_executor(None, request._request.accept)
                thread = threading.Thread(target=serve_blocking, args=(index, blocking, args.reply_timeout))
                thread.start()
                threads.append(thread)
        say("ACCEPTED")
        await asyncio.gather(*tasks)
        for thread in threads:
            await loop.run_in_executor(None, thread.join)
    finally:
        await port.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("drivers")
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--budget-mib", type=int, default=4)
    parser.add_argument("--reply-timeout", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

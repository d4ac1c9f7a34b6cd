"""Servers for the slow- and busy-peer tests (test_aio_serve_busy_credit,
test_aio_send_timeout_waiters, test_completion_deaf_client, test_rpc_deaf_client).

Run as ``python tests/slow_peers.py ROLE NAME --runtime-dir DIR [--max-tasks N]``; prints
``READY`` once its port exists. Roles:

- ``aio``: ``alpc.aio`` ``AsyncConnectionPort.serve`` with ``--max-tasks``: a datagram
  counts one; a request ``count`` answers how many datagrams were handled, ``errors`` how
  many exceptions reached the event loop's handler (each also said as ``LOOP_ERROR``),
  anything else is echoed upper-cased. ``--send-timeout`` is the port's.
- ``completion``: ``alpc.CompletionPort`` (``--max-workers``, ``--send-timeout``) echoing
  every request's body upper-cased.
- ``deaf``: connects, writes ``--count`` raw requests (small replies) at once and never reads a
  reply (``--rpc``: connecting as a client of tests/rpc_peers.py's Store, so the calls are
  answered with errors); says ``FLOODED``, then ``DROPPED`` once the server hangs up on it.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import sys

import alpc
from alpc import aio
from alpc.rpc.client import client_hello
from alpc.wire import MessageType, encode_frame


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve_aio(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    handled = 0
    errors: list[str] = []

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        errors.append(repr(context.get("exception") or context.get("message")))
        say("LOOP_ERROR " + errors[-1].replace(" ", "_"))

    asyncio.get_running_loop().set_exception_handler(on_error)

    async def handler(message: alpc.Message) -> bytes | None:
        nonlocal handled
        if message.type is MessageType.DATAGRAM:
            handled += 1
            return None
        data = bytes(message.data)
        if data == b"count":
            return str(handled).encode()
        return str(len(errors)).encode() if data == b"errors" else data.upper()

    attributes = alpc.PortAttributes(send_timeout=args.send_timeout)
    port = await aio.create_port(args.name, attributes, config=config)
    say("READY")
    try:
        await port.serve(handler, max_tasks=args.max_tasks)
    finally:
        await port.close()


def serve_completion(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(send_timeout=args.send_timeout)
    with alpc.create_port(args.name, attributes, config=config) as port, \
            alpc.CompletionPort(port, lambda message: bytes(message.data).upper(),
                                max_workers=args.max_workers) as server:
        say("READY")
        server.serve()


def deaf(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    hello = b""
    if args.rpc:
        from rpc_peers import Store  # beside this file; the RPC server's interface

        hello = client_hello(Store)
    comm = alpc.connect(args.name, hello, config=config, timeout=5)
    frames = b"".join(encode_frame(MessageType.REQUEST, b"s" * 90, message_id=n) for n in range(1, args.count + 1))
    comm._stream.send([frames], deadline=None)
    say("FLOODED")
    poller = select.poll()
    poller.register(comm.fileno(), select.POLLRDHUP)
    if poller.poll(30_000):
        say("DROPPED")
    comm.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["aio", "completion", "deaf"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--max-tasks", type=int, default=1024)
    parser.add_argument("--max-workers", type=int, default=4)
    parser.add_argument("--send-timeout", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rpc", action="store_true", help="deaf: connect as an RPC client of rpc_peers.Store")
    args = parser.parse_args()
    if args.role == "aio":
        asyncio.run(serve_aio(args))
    elif args.role == "completion":
        serve_completion(args)
    else:
        deaf(args)


if __name__ == "__main__":
    main()

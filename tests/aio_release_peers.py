"""Real peer processes for the asyncio one-step read tests (test_aio_one_step_read_wakes.py and
test_aio_expired_body_release.py).

Run as ``python tests/aio_release_peers.py ROLE NAME --runtime-dir DIR [options]``. Each
prints ``READY`` once its port exists and one line per event after: tests wait on lines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import alpc
from alpc import aio


def say(*parts: object) -> None:
    print(*parts, flush=True)


def held(args: argparse.Namespace) -> None:
    """Accept one client; for each request print ``REQUEST <len>``, then reply ``b"ok"`` (inline)
    only when a stdin line comes (a line ``datagram`` sends the datagram ``b"dg"`` first and
    says ``SENT``); reading nothing meanwhile. Ends at the client's close."""
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(max_pending_requests=args.pending, section_size=args.section,
                                     max_section_bytes=args.section)
    with alpc.create_port(args.name, attributes, config=config) as port:
        say("READY", os.getpid())
        with port.listen(timeout=30).accept() as comm:
            say("ACCEPTED")
            while True:
                message = comm.receive(timeout=30)
                if message.type is not alpc.MessageType.REQUEST:
                    break
                say("REQUEST", len(message.data))
                line = sys.stdin.readline()
                if line == "datagram\n":
                    comm.send(b"dg", timeout=10)
                    say("SENT")
                    line = sys.stdin.readline()
                if not line:
                    break
                message.reply(b"ok", timeout=10)


def aioserve(args: argparse.Namespace) -> None:
    """An asyncio server: accept one client, serve() it (every request answered ``b"ok"``)
    until it closes."""

    async def run() -> None:
        config = alpc.Config.from_env(args.runtime_dir)
        port = await aio.create_port(args.name, config=config)
        try:
            say("READY", os.getpid())
            comm = await (await port.listen(timeout=30)).accept()
            say("ACCEPTED")

            async def answer(message: alpc.Message) -> bytes:
                return b"ok"

            await comm.serve(answer)
            await comm.close()
        finally:
            await port.close()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--pending", type=int, default=1024)
    parser.add_argument("--section", type=int, default=65536)
    args = parser.parse_args()
    {"held": held, "aioserve": aioserve}[args.role](args)


if __name__ == "__main__":
    main()

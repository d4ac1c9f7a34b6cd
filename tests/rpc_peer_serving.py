"""What the RPC server peers share: serve one implementation, on the blocking server or the
asyncio one, from READY until the test closes the peer's stdin."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

import alpc
from alpc import rpc

__all__ = ["server_arguments", "serve_until_stdin_closes"]


def server_arguments(workers: int) -> argparse.ArgumentParser:
    """The options every such peer takes: the port's name, the runtime dir, the blocking
    server's workers, and --asyncio."""
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--workers", type=int, default=workers)
    parser.add_argument("--asyncio", action="store_true")
    return parser


def serve_until_stdin_closes(args: argparse.Namespace, blocking: Callable[[], rpc.Interface],
                             asynchronous: Callable[[], rpc.Interface]) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    if args.asyncio:
        async def serve() -> None:
            async with rpc.aio.Server(args.name, asynchronous(), config=config):
                print("READY", os.getpid(), flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

        asyncio.run(serve())
        return
    with rpc.Server(args.name, blocking(), workers=args.workers, config=config):
        print("READY", os.getpid(), flush=True)
        sys.stdin.read()

"""RPC server peers for tests/test_rpc_faults.py: handlers whose outcome is awkward to encode.

Run as ``python tests/rpc_fault_peers.py ROLE NAME --runtime-dir DIR`` (ROLE: server or
async-server); prints ``READY`` once it serves and runs until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import alpc
from alpc import rpc


class Faulty(rpc.Interface, name="fault.faulty", version=(1, 0)):
    @rpc.method
    def unencodable_error(self) -> None: ...

    @rpc.method
    def unprintable_result(self) -> Any: ...

    @rpc.method
    def echo(self, value: Any) -> list[Any]: ...

    @rpc.method
    def visit(self, visitor: Any, value: Any) -> Any: ...

    @rpc.method(oneway=True)
    def fire(self, visitor: Any, value: Any) -> None: ...

    @rpc.method
    def pid(self) -> int: ...


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


class FaultyImpl(Faulty):
    def unencodable_error(self) -> None:
        # A name read from the file system with undecodable bytes (os.fsdecode's surrogateescape).
        name = os.fsdecode(b"caf\xe9")
        raise ValueError("no such entry: " + name)

    def unprintable_result(self) -> Any:
        return [1, Unprintable()]

    def echo(self, value: Any) -> list[Any]:
        return [f"{type(value).__module__}.{type(value).__qualname__}", value]

    def visit(self, visitor: Any, value: Any) -> Any:
        return visitor.visit(value)

    def fire(self, visitor: Any, value: Any) -> None:
        pass

    def pid(self) -> int:
        return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "async-server"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    args = parser.parse_args()
    config = alpc.Config.from_env(args.runtime_dir)
    if args.role == "server":
        with rpc.Server(args.name, FaultyImpl(), workers=2, config=config):
            print("READY", os.getpid(), flush=True)
            sys.stdin.read()
        return

    async def serve() -> None:
        async with rpc.aio.Server(args.name, FaultyImpl(), config=config):
            print("READY", os.getpid(), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(serve())


if __name__ == "__main__":
    main()

"""RPC server peers for tests/test_rpc_options.py: a service a hostile client can push on.

Run as ``python tests/rpc_option_peers.py ROLE NAME --runtime-dir DIR`` (ROLE: server or
async-server); prints ``READY <pid>`` once it serves and runs until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import alpc
from alpc import rpc


class Relay(rpc.Interface, name="options.relay", version=(1, 0)):
    @rpc.method
    def remaining(self) -> float | None: ...  # the call's remaining() as the handler sees it

    @rpc.method
    def relay(self, sink: Any, value: Any) -> Any: ...  # calls sink(value), returns its result

    @rpc.method
    def biggest(self, a: Any, b: Any) -> Any: ...  # served by the builtin max()

    @rpc.method
    def pid(self) -> int: ...


class RelayImpl(Relay):
    biggest = staticmethod(max)  # a C function: inspect.signature() cannot read it

    def remaining(self) -> float | None:
        return rpc.current_call().remaining()

    def relay(self, sink: Any, value: Any) -> Any:
        return sink(value)

    def pid(self) -> int:
        return os.getpid()


class AsyncRelayImpl(RelayImpl):
    async def relay(self, sink: Any, value: Any) -> Any:  # type: ignore[override]
        return await sink(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "async-server"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    args = parser.parse_args()
    config = alpc.Config.from_env(args.runtime_dir)
    if args.role == "server":
        with rpc.Server(args.name, RelayImpl(), workers=2, config=config):
            print("READY", os.getpid(), flush=True)
            sys.stdin.read()
        return

    async def serve() -> None:
        async with rpc.aio.Server(args.name, AsyncRelayImpl(), config=config):
            print("READY", os.getpid(), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(serve())


if __name__ == "__main__":
    main()

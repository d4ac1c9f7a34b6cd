"""RPC server peers for tests/test_rpc_misuse.py: handlers a hostile or careless client can misuse.

Run as ``python tests/rpc_misuse_peers.py ROLE NAME --runtime-dir DIR`` (ROLE: server or
async-server); prints ``READY <pid>`` once it serves and runs until its stdin closes.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from rpc_peer_main import serve_until_stdin_closes

from alpc import rpc


class Hub(rpc.Interface, name="misuse.hub", version=(1, 0)):
    @rpc.method
    def subscribe(self, sink: Any) -> None:
        """Keeps ``sink`` past the call that passed it (which the README says it may not use)."""

    @rpc.method
    def publish(self, value: Any) -> Any: ...  # calls the kept sink

    @rpc.method
    def run(self, argv: list[str]) -> str: ...  # parses the caller's command line (argparse)

    @rpc.method
    def options(self, *args: Any, **kwargs: Any) -> Any: ...

    @rpc.method(oneway=True)
    def poke(self, sink: Any) -> None:
        """Calls ``sink``, which a well-behaved client cannot pass to a one-way method."""

    @rpc.method
    def pokes(self) -> int: ...  # how many poke() calls ran

    @rpc.method
    def pid(self) -> int: ...


def parse(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="hub", exit_on_error=False)
    parser.add_argument("--name", default="world")
    # An unknown option makes argparse call sys.exit(2), exit_on_error or not.
    return f"hello {parser.parse_args(argv).name}"


class HubImpl(Hub):
    def __init__(self) -> None:
        self.sink: Any = None
        self.poked = 0

    def subscribe(self, sink: Any) -> None:
        self.sink = sink

    def publish(self, value: Any) -> Any:
        return self.sink(value)

    def run(self, argv: list[str]) -> str:
        return parse(argv)

    def options(self, *args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]

    def poke(self, sink: Any) -> None:
        self.poked += 1
        sink(self.poked)

    def pokes(self) -> int:
        return self.poked

    def pid(self) -> int:
        return os.getpid()


class AsyncHubImpl(HubImpl):
    async def publish(self, value: Any) -> Any:
        return await self.sink(value)

    async def poke(self, sink: Any) -> None:  # type: ignore[override]
        self.poked += 1
        await sink(self.poked)


def main() -> None:
    serve_until_stdin_closes(HubImpl(), AsyncHubImpl())


if __name__ == "__main__":
    main()

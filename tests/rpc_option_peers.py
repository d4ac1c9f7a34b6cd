"""RPC server peers for tests/test_rpc_options.py: a service a hostile client can push on.

Run as ``python tests/rpc_option_peers.py ROLE NAME --runtime-dir DIR`` (ROLE: server or
async-server); prints ``READY <pid>`` once it serves and runs until its stdin closes.
"""

from __future__ import annotations

import os
from typing import Any

from rpc_peer_main import serve_until_stdin_closes

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
    serve_until_stdin_closes(RelayImpl(), AsyncRelayImpl())


if __name__ == "__main__":
    main()

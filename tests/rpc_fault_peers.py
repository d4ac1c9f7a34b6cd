"""RPC server peers for tests/test_rpc_faults.py: handlers whose outcome is awkward to encode.

Run as ``python tests/rpc_fault_peers.py ROLE NAME --runtime-dir DIR`` (ROLE: server or
async-server); prints ``READY`` once it serves and runs until its stdin closes.
"""

from __future__ import annotations

import os
from typing import Any

from rpc_peer_main import serve_until_stdin_closes

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
    serve_until_stdin_closes(FaultyImpl(), FaultyImpl())


if __name__ == "__main__":
    main()

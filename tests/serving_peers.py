"""Peers for tests/test_examples_survive.py: clients that give up between their connect and its accept.

    python serving_peers.py half-closed NAME --runtime-dir DIR

connects to NAME with its socket's read side shut down before the CONNECT goes out, so the
server's accept (its connection reply) fails with EPIPE however soon it runs; prints
``SENT`` once the CONNECT is written, then waits for stdin to close.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

import alpc
from alpc import port as _port
from alpc.transport import Stream


def half_closed(name: str, config: alpc.Config) -> None:
    real_connect = Stream.connect.__func__  # type: ignore[attr-defined]

    def connect(cls: type[Stream], *args: Any, **kwargs: Any) -> Stream:
        stream: Stream = real_connect(cls, *args, **kwargs)
        # shutdown() acts on the socket, not the fd: a dup shuts the stream's own read side.
        side = socket.socket(fileno=os.dup(stream.fileno()))
        side.shutdown(socket.SHUT_RD)
        side.close()
        return stream

    def await_reply(*args: Any, **kwargs: Any) -> Any:
        print("SENT", flush=True)
        sys.stdin.read()
        raise SystemExit(0)

    Stream.connect = classmethod(connect)  # type: ignore[method-assign,assignment]
    _port._await_connection_reply = await_reply  # type: ignore[assignment]
    alpc.connect(name, config=config, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", type=Path, required=True)
    args = parser.parse_args()
    config = alpc.Config.from_env(args.runtime_dir)
    if args.role == "half-closed":
        half_closed(args.name, config)
    else:
        raise SystemExit(f"unknown role {args.role!r}")


if __name__ == "__main__":
    main()

"""Peers for tests/test_rpc_nested_deadline.py and test_rpc_orphaned_call.py: a Relay server, a killed client."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Any

import alpc
from alpc import rpc
from alpc.rpc.endpoint import Endpoint


class Relay(rpc.Interface, name="test.relay", version=(1, 0)):
    @rpc.method
    def relay(self, sink: Any, data: Any) -> list[Any]: ...

    @rpc.method
    def spin(self, label: str, data: Any = None) -> str: ...

    @rpc.method
    def size(self, data: Any) -> int: ...


class Sink(rpc.Interface, name="test.sink", version=(1, 0)):
    @rpc.method
    def take(self, data: Any) -> Any: ...


def say(*parts: object) -> None:
    print(*parts, flush=True)


class RelayImpl(Relay):
    def relay(self, sink: Any, data: Any) -> list[Any]:
        # A nested call: it inherits this call's deadline.
        try:
            taken = sink.take(data)
        except alpc.Timeout:
            say("NESTED_TIMEOUT")
            raise
        return [len(taken), hashlib.sha256(taken).hexdigest()]

    def spin(self, label: str, data: Any = None) -> str:
        # A long job that polls the cancel flag, as the README shows.
        call = rpc.current_call()
        say("SPINNING", label)
        give_up = time.monotonic() + 30
        while not call.cancelled:
            if time.monotonic() > give_up:
                say("NOT_CANCELLED", label)
                return "not cancelled"
            time.sleep(0.002)  # handshake-free: the work between two polls of the flag under test
        say("CANCELLED", label)
        return "cancelled"

    def size(self, data: Any) -> int:
        return len(data)


def say_replied() -> None:
    """A line once each reply is written: a test's handshake for "the answer is on its way"."""
    write = Endpoint._write_reply

    def written(self: Endpoint, message: Any, payload: Any) -> None:
        write(self, message, payload)
        say("REPLIED")

    Endpoint._write_reply = written  # type: ignore[method-assign]


def serve(args: argparse.Namespace) -> None:
    say_replied()
    config = alpc.Config.from_env(args.runtime_dir)
    with rpc.Server(args.name, RelayImpl(), workers=args.workers, config=config):
        say("READY", os.getpid())
        sys.stdin.read()


def spin_client(args: argparse.Namespace) -> None:
    """Makes one spin() call that never ends by itself (the test kills this process)."""
    config = alpc.Config.from_env(args.runtime_dir)
    client = rpc.connect(Relay, args.name, config=config, timeout=10)
    say("CALLING")
    client.proxy.spin("orphan", os.urandom(args.size) if args.size else None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "spin-client"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--size", type=int, default=0)
    args = parser.parse_args()
    {"server": serve, "spin-client": spin_client}[args.role](args)


if __name__ == "__main__":
    main()

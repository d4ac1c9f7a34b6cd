"""Real RPC peer processes for the end-to-end tests (and the interface they share).

Run as ``python tests/rpc_peers.py ROLE NAME --runtime-dir DIR``. A role prints
``READY`` once it serves and runs until its stdin closes, so tests synchronise
on lines, never on sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import threading
import time
from typing import Any

import alpc
from alpc import rpc


class Store(rpc.Interface, name="test.store", version=(2, 3)):
    """What the end-to-end tests call."""

    @rpc.method
    def put(self, key: str, value: Any) -> None: ...

    @rpc.method
    def get(self, key: str) -> Any: ...

    @rpc.method
    def echo(self, *args: Any, **kwargs: Any) -> list[Any]: ...

    @rpc.method
    def fail(self, kind: str) -> None: ...

    @rpc.method
    def whoami(self) -> dict[str, Any]: ...

    @rpc.method
    def sleep(self, seconds: float, label: str = "") -> float | None: ...

    @rpc.method
    def started(self) -> list[str]: ...

    @rpc.method(oneway=True)
    def note(self, text: str) -> None: ...

    @rpc.method
    def notes(self) -> list[str]: ...

    @rpc.method
    def visit(self, visitor: Any, count: int) -> int: ...

    @rpc.method
    def bounce(self, peer: Any, depth: int) -> list[int]: ...

    @rpc.method
    def digest(self, data: Any) -> list[Any]: ...

    @rpc.method
    def blob(self, size: int, fill: int = 0x61) -> bytes: ...

    @rpc.method(require_uid=os.getuid() + 1)
    def admin(self) -> str: ...

    @rpc.method(require_group=os.getgid())
    def members(self) -> str: ...

    @rpc.method
    def pid(self) -> int: ...

    @rpc.method
    def gather(self, parties: int, timeout: float) -> bool: ...

    @rpc.method
    def keep(self, target: Any) -> None: ...

    @rpc.method
    def call_kept(self) -> Any: ...

    @rpc.method
    def fire(self, target: Any, count: int) -> int: ...

    @rpc.method
    def spin(self, label: str) -> str: ...


class StoreImpl(Store):
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.log: list[str] = []
        self.lock = threading.Lock()
        self.barriers: dict[int, threading.Barrier] = {}
        self.kept: Any = None

    def put(self, key: str, value: Any) -> None:
        self.data[key] = bytes(value) if isinstance(value, memoryview) else value

    def get(self, key: str) -> Any:
        return self.data[key]

    def echo(self, *args: Any, **kwargs: Any) -> list[Any]:
        return [list(args), kwargs]

    def fail(self, kind: str) -> None:
        if kind == "key":
            raise KeyError(kind)
        if kind == "custom":
            raise CustomError("a custom failure")
        if kind == "denied":
            raise alpc.AccessDenied("not you")
        raise RuntimeError(kind)

    def whoami(self) -> dict[str, Any]:
        call = rpc.current_call()
        return {**call.caller.as_dict(), "remaining": call.remaining(), "method": call.method}

    def sleep(self, seconds: float, label: str = "") -> float | None:
        with self.lock:
            self.log.append(label or "sleep")
        say("SLEEPING", label or "-")
        time.sleep(seconds)  # handshake-free: the call under test must take this long
        return rpc.current_call().remaining()

    def started(self) -> list[str]:
        with self.lock:
            return list(self.log)

    def note(self, text: str) -> None:
        with self.lock:
            self.log.append("note:" + text)
        say("NOTE", text)

    def notes(self) -> list[str]:
        with self.lock:
            return [entry[5:] for entry in self.log if entry.startswith("note:")]

    def visit(self, visitor: Any, count: int) -> int:
        return sum(visitor.visit(index) for index in range(count))

    def bounce(self, peer: Any, depth: int) -> list[int]:
        # The client's peer calls back into us (bounce again) while we wait for it.
        if depth <= 0:
            return [os.getpid()]
        return [os.getpid(), *peer.back(depth - 1)]

    def digest(self, data: Any) -> list[Any]:
        readonly = data.readonly if isinstance(data, memoryview) else None
        return [type(data).__name__, readonly, len(data), hashlib.sha256(data).hexdigest()]

    def blob(self, size: int, fill: int = 0x61) -> bytes:
        return bytes([fill]) * size

    def admin(self) -> str:
        return "admin"

    def members(self) -> str:
        return "members"

    def pid(self) -> int:
        return os.getpid()

    def gather(self, parties: int, timeout: float) -> bool:
        # Returns only if `parties` calls run at the same time: proves concurrency without timing.
        with self.lock:
            barrier = self.barriers.setdefault(parties, threading.Barrier(parties))
        try:
            barrier.wait(timeout)
        except threading.BrokenBarrierError:
            return False
        return True

    def keep(self, target: Any) -> None:
        self.kept = target

    def call_kept(self) -> Any:
        return self.kept.visit(1)

    def fire(self, target: Any, count: int) -> int:
        for index in range(count):
            target(index)
        return count

    def spin(self, label: str) -> str:
        # A sync handler that stops once its caller cancels: polls the flag, as a long job would.
        call = rpc.current_call()
        say("SPINNING", label)
        give_up = time.monotonic() + 30
        while not call.cancelled:
            if time.monotonic() > give_up:
                say("NOT_CANCELLED", label)
                return "not cancelled"
            time.sleep(0.005)  # handshake-free: the work between two polls of the flag under test
        say("CANCELLED", label)
        return "cancelled (a reply nobody receives)"


class AsyncStoreImpl(StoreImpl):
    """The same Store with async handlers, for rpc.aio.Server (plain ones run on the loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.async_barriers: dict[int, asyncio.Barrier] = {}

    async def sleep(self, seconds: float, label: str = "") -> float | None:  # type: ignore[override]
        self.log.append(label or "sleep")
        say("SLEEPING", label or "-")
        try:
            await asyncio.sleep(seconds)  # handshake-free: the call under test must take this long
        except asyncio.CancelledError:
            say("CANCELLED", label or "-", rpc.current_call().cancelled)
            raise
        return rpc.current_call().remaining()

    async def visit(self, visitor: Any, count: int) -> int:  # type: ignore[override]
        return sum([await visitor.visit(index) for index in range(count)])

    async def fire(self, target: Any, count: int) -> int:  # type: ignore[override]
        for index in range(count):
            await target(index)
        return count

    async def gather(self, parties: int, timeout: float) -> bool:  # type: ignore[override]
        barrier = self.async_barriers.setdefault(parties, asyncio.Barrier(parties))
        try:
            async with asyncio.timeout(timeout):
                await barrier.wait()
        except TimeoutError:
            return False
        return True

    async def whoami(self) -> dict[str, Any]:  # type: ignore[override]
        await asyncio.sleep(0)  # handshake-free: a yield point, to show the context survives a suspension
        return super().whoami()


class CustomError(Exception):
    pass


class StoreV3(rpc.Interface, name="test.store", version=(3, 0)):
    @rpc.method
    def pid(self) -> int: ...


class StoreV2Newer(Store, name="test.store", version=(2, 9)):
    pass


def say(*parts: object) -> None:
    print(*parts, flush=True)


def serve(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(max_message_length=args.max_message_length,
                                     max_section_bytes=args.max_section_bytes)
    server = rpc.Server(args.name, StoreImpl(), workers=args.workers, config=config, attributes=attributes,
                        send_tracebacks=args.tracebacks, reply_timeout=args.reply_timeout)
    with server:
        say("READY", os.getpid())
        sys.stdin.read()


def async_serve(args: argparse.Namespace) -> None:
    async def main() -> None:
        config = alpc.Config.from_env(args.runtime_dir)
        attributes = alpc.PortAttributes(max_message_length=args.max_message_length,
                                         max_section_bytes=args.max_section_bytes)
        async with rpc.aio.Server(args.name, AsyncStoreImpl(), config=config, attributes=attributes,
                                  send_tracebacks=args.tracebacks):
            say("READY", os.getpid())
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    if args.loop == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        asyncio.run(main())


def callback_server(args: argparse.Namespace) -> None:
    """Port level: every request is answered only after a nested request back to the client."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, config=config) as port:
        say("READY", os.getpid())
        while True:
            event = port.wait(timeout=30)
            if isinstance(event, alpc.ConnectionRequest):
                event.accept()
            elif event.type is alpc.MessageType.REQUEST:
                comm = event.port
                comm.send(b"note:" + event.data)
                try:
                    answer = comm.request(b"callback:" + event.data, timeout=args.callback_timeout,
                                          on_message=lambda nested: nested.reply(b"nested:" + nested.data))
                except alpc.Timeout:
                    say("CALLBACK_TIMEOUT")
                    continue
                except alpc.Unanswered:  # the client's runtime answered for it: dropped by its hook
                    say("CALLBACK_UNANSWERED")
                    continue
                event.reply(b"done:" + answer.data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "async-server", "callback-server"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tracebacks", action="store_true")
    parser.add_argument("--reply-timeout", type=float, default=5.0)
    parser.add_argument("--callback-timeout", type=float, default=10.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--max-message-length", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--max-section-bytes", type=int, default=alpc.PortAttributes().max_section_bytes)
    args = parser.parse_args()
    roles = {"server": serve, "async-server": async_serve, "callback-server": callback_server}
    roles[args.role](args)


if __name__ == "__main__":
    main()

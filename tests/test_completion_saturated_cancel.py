"""A cancel reaches its handler even while every worker of a completion port is busy.

The port's runtime flags a cancelled request (``message.cancelled``) and cancels an async
handler's task only when something reads the client's socket. In a completion port that is a
pool thread waiting on the port; when every pool thread is in a handler (a pool of one, always)
nobody read, so a sync handler polling the flag never saw it and an async one was never
cancelled. The client is a real process (tests/cancel_client_peers.py); line handshakes order it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import alpc
from alpc.completion import CompletionPort

PEERS = Path(__file__).resolve().parent / "cancel_client_peers.py"

pytestmark = pytest.mark.timeout(60)


def _client(spawn: Any, runtime_dir: Path, name: str) -> Any:
    peer = spawn.argv([sys.executable, str(PEERS), "client", name, "--runtime-dir", str(runtime_dir)])
    peer.expect("READY")
    return peer


def test_a_sync_handler_of_a_one_worker_pool_sees_its_cancel(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    entered, saw_cancel, give_up = threading.Event(), threading.Event(), threading.Event()

    def handler(message: alpc.Message) -> bytes:
        entered.set()
        while not give_up.wait(0.005):  # the handler's own work, polling the flag between steps
            if message.cancelled:
                saw_cancel.set()
                return b""
        return b"unseen"

    with alpc.create_port("svc.cancel.one", config=config) as port:
        completion = CompletionPort(port, handler, max_workers=1)
        serving = threading.Thread(target=completion.serve)
        serving.start()
        try:
            client = _client(spawn, runtime_dir, "svc.cancel.one")
            client.send("start slow")
            client.expect("STARTED slow")
            assert entered.wait(10)
            client.send("cancel slow")
            assert client.expect("CANCEL slow") == ["True"]
            assert saw_cancel.wait(10), "the handler never saw its request cancelled"
            client.send("wait slow 5")
            assert client.expect("CANCELLED slow") == []
            client.send("quit")
            client.expect("BYE")
        finally:
            give_up.set()
            completion.stop()
            serving.join(10)


def test_an_async_handler_is_cancelled_while_the_dispatcher_waits_for_a_slot(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    """max_workers=1: the first request's task holds the only slot and the serving thread,
    having taken the second request, waits for that slot instead of reading the port."""
    entered, cancelled, give_up = threading.Event(), threading.Event(), threading.Event()
    waiting_for_slot = threading.Event()

    async def handler(message: alpc.Message) -> bytes:
        if message.data == b"slow":
            entered.set()
            try:
                await asyncio.get_running_loop().run_in_executor(None, give_up.wait, 30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return message.data.upper()

    with alpc.create_port("svc.cancel.slot", config=config) as port:
        completion = CompletionPort(port, handler, max_workers=1)
        submit = completion._submit_task

        def submit_noted(message: alpc.Message) -> None:
            if message.data == b"next":
                waiting_for_slot.set()
            submit(message)

        completion._submit_task = submit_noted  # type: ignore[method-assign]
        serving = threading.Thread(target=completion.serve)
        serving.start()
        try:
            client = _client(spawn, runtime_dir, "svc.cancel.slot")
            client.send("start slow")
            client.expect("STARTED slow")
            assert entered.wait(10)
            client.send("start next")
            client.expect("STARTED next")
            assert waiting_for_slot.wait(10)
            client.send("cancel slow")
            assert client.expect("CANCEL slow") == ["True"]
            assert cancelled.wait(10), "the handler's task was never cancelled"
            client.send("wait next 10")
            assert client.expect("REPLY next") == ["NEXT"]
            client.send("quit")
            client.expect("BYE")
        finally:
            give_up.set()
            completion.stop()
            serving.join(10)

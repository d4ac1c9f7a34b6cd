"""An async pool still reads its clients while its dispatcher runs another client's on_connect.

An ``async def`` handler's pool has one dispatching thread, and it runs ``on_connect`` (and the
accept) itself. Meanwhile nobody read the port: a client's CANCEL waited in its socket and its
running handler task was not cancelled until ``on_connect`` returned (a slow one: a lookup, an
audit log), though the watcher exists for exactly that (a sync pool has another thread or the
watcher read it). The clients are real processes (tests/cancel_client_peers.py); line handshakes
and events order every step.
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


def test_a_cancel_reaches_an_async_handler_while_on_connect_runs(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    entered, cancelled = threading.Event(), threading.Event()
    connecting, hold = threading.Event(), threading.Event()
    name = "svc.cport.connect.watch"

    async def handler(message: alpc.Message) -> bytes:
        entered.set()
        try:
            while not hold.is_set():
                await asyncio.sleep(0.01)  # handshake-free: the handler's own work, until its cancel comes
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"unseen"

    calls = [0]

    def on_connect(request: Any) -> bool:
        calls[0] += 1
        if calls[0] == 2:  # the second client: a slow check
            connecting.set()
            hold.wait(30)
        return True

    argv = [sys.executable, str(PEERS), "client", name, "--runtime-dir", str(runtime_dir)]
    with alpc.create_port(name, config=config) as port:
        completion = CompletionPort(port, handler, on_connect=on_connect)
        serving = threading.Thread(target=completion.serve)
        serving.start()
        try:
            first = spawn.argv(argv)
            first.expect("READY")
            first.send("start slow")
            first.expect("STARTED slow")
            assert entered.wait(10)
            second = spawn.argv(argv)  # its on_connect holds the dispatcher
            assert connecting.wait(10)
            first.send("cancel slow")
            assert first.expect("CANCEL slow") == ["True"]
            # Unfixed: not before on_connect returns (hold is set in the finally clause only).
            assert cancelled.wait(5), "the handler's task was not cancelled while on_connect ran"
            hold.set()
            second.expect("READY")
            for peer in (first, second):
                peer.send("quit")
                peer.expect("BYE")
        finally:
            hold.set()
            completion.stop()
            serving.join(10)
    assert not serving.is_alive()

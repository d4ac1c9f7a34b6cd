"""An idle pool thread does not retire while every other pool thread is in a handler.

``_retire`` let an extra thread leave once it sat idle for ``idle_timeout`` whenever the pool
had more than ``min_workers`` threads, even when the others were all in handlers: then nobody
waited on the port (and the watcher only starts when ``_promote`` finds the pool full). A
cancel never reached the running handler, and another client's request waited until that
handler returned although the pool may grow to ``max_workers``. The clients are real processes
(tests/cancel_client_peers.py); line handshakes order them, and the test waits for the extra
thread's retire decisions themselves (``Watched``), not for time to pass: the thread the
accept spawned leaves first, so serve()'s own thread takes the slow request and spawns the
extra thread that then sits idle.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import alpc
from alpc.completion import CompletionPort

PEERS = Path(__file__).resolve().parent / "cancel_client_peers.py"

pytestmark = pytest.mark.timeout(60)


class Watched(CompletionPort):
    """Says when an extra thread has decided, once the handler runs, whether it retires."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.decided = threading.Event()
        self.retired = threading.Event()

    def _retire(self, idle_since: float) -> bool:
        verdict = super()._retire(idle_since)
        if verdict:
            self.retired.set()
        if self.entered.is_set():
            self.decided.set()
        return verdict


def _client(spawn: Any, runtime_dir: Path, name: str) -> Any:
    peer = spawn.argv([sys.executable, str(PEERS), "client", name, "--runtime-dir", str(runtime_dir)])
    peer.expect("READY")
    return peer


def _serve(config: alpc.Config, name: str, handler: Any) -> tuple[alpc.ConnectionPort, Watched, threading.Thread]:
    port = alpc.create_port(name, config=config)
    # idle_timeout=0: the extra thread decides at its first idle wait (a 0.2 s tick).
    completion = Watched(port, handler, max_workers=2, min_workers=1, idle_timeout=0)
    serving = threading.Thread(target=completion.serve)
    serving.start()
    return port, completion, serving


def test_a_cancel_reaches_a_handler_after_the_extra_thread_went_idle(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    saw_cancel, give_up = threading.Event(), threading.Event()
    completion: Watched | None = None

    def handler(message: alpc.Message) -> bytes:
        assert completion is not None
        completion.entered.set()
        while not give_up.wait(0.005):
            if message.cancelled:
                saw_cancel.set()
                return b""
        return b"unseen"

    port, completion, serving = _serve(config, "svc.zz.retire.cancel", handler)
    try:
        client = _client(spawn, runtime_dir, "svc.zz.retire.cancel")
        # The accept spawned an extra thread; once it left, serve()'s own thread takes the request.
        assert completion.retired.wait(10)
        client.send("start slow")
        client.expect("STARTED slow")
        assert completion.entered.wait(10)
        assert completion.decided.wait(10)
        client.send("cancel slow")
        assert client.expect("CANCEL slow") == ["True"]
        assert saw_cancel.wait(5), "the handler never saw its cancel: nobody read the port"
        client.send("quit")
        client.expect("BYE")
    finally:
        give_up.set()
        completion.stop()
        serving.join(10)
        port.close()
    assert not serving.is_alive()


def test_another_client_is_served_while_the_only_busy_thread_handles(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    release = threading.Event()
    completion: Watched | None = None

    def handler(message: alpc.Message) -> bytes:
        assert completion is not None
        if bytes(message.data) == b"slow":
            completion.entered.set()
            release.wait(30)
        return b"done-" + bytes(message.data)

    port, completion, serving = _serve(config, "svc.zz.retire.grow", handler)
    try:
        slow = _client(spawn, runtime_dir, "svc.zz.retire.grow")
        assert completion.retired.wait(10)
        slow.send("start slow")
        slow.expect("STARTED slow")
        assert completion.entered.wait(10)
        assert completion.decided.wait(10)
        quick = _client(spawn, runtime_dir, "svc.zz.retire.grow")
        quick.send("start fast")
        quick.expect("STARTED fast")
        quick.send("wait fast 5")
        assert quick.expect("") == ["REPLY", "fast", "done-fast"], "a free worker slot, yet nobody took the request"
        release.set()
        slow.send("wait slow 10")
        assert slow.expect("") == ["REPLY", "slow", "done-slow"]
        for peer in (quick, slow):
            peer.send("quit")
            peer.expect("BYE")
    finally:
        release.set()
        completion.stop()
        serving.join(10)
        port.close()
    assert not serving.is_alive()

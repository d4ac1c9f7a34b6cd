"""A process that ends while a CompletionPort with an async handler serves a deaf client.

The replies that may wait for a client's socket were written by a ThreadPoolExecutor, whose
threads the interpreter joins at exit: a process ending while one waited on a client that
stopped reading waited its send_timeout (every deaf client beyond the pool's size: another
send_timeout), and printed the failed reply's traceback on its way out. The pool's threads
are daemon threads now, as every other thread of the completion port.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "exit_peers.py"
REQUESTS = 400  # their replies fill the socket of a client that never reads (about 170 fit)

pytestmark = pytest.mark.timeout(90)


def test_exit_does_not_wait_for_a_reply_to_a_deaf_client(broker: alpc.Broker, config: alpc.Config, spawn: Any,
                                                         runtime_dir: Path) -> None:
    name = "zz.exit.completion"
    server = spawn.argv([sys.executable, str(PEERS), "completion", name, "--runtime-dir", str(runtime_dir),
                         "--requests", str(REQUESTS)])
    server.expect("READY")
    with alpc.connect(name, config=config, timeout=10) as client:
        for _ in range(REQUESTS):
            client.start_request(b"call", timeout=10)  # never read: the replies pile up
        server.expect("HANDLED")
        server.send("exit")
        server.expect("EXITING")
        started = time.monotonic()
        code = server.proc.wait(60)
        took = time.monotonic() - started
    assert code == 0
    # Unfixed: the reply's send_timeout (30 s), then its traceback on stderr.
    assert took < 5, f"exit took {took:.1f}s"
    assert server.expect_stderr("", timeout=1) == ""

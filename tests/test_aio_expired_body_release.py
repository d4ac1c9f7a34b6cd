"""An asyncio server answers a request whose deadline passed before dispatch by itself (a
CANCELLED reply): the range its small section body held must go back with that answer.

Bodies up to EAGER_COPY_MAX are copied out on arrival and their release queued to ride with
the reply. A request that expires in the inbox gets no reply from the application: the
runtime's answer went out by ``_after_take``'s ``_post``, which sends only the automatic
frames, so the release stayed queued until the server's next read (the client's section
space held for as long as the client sent nothing). Before the eager copy, the expired
message's unread body was a view whose collection flushed its release.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

import alpc
from alpc.transport import wait_readable

PEERS = Path(__file__).resolve().parent / "aio_release_peers.py"

pytestmark = pytest.mark.timeout(60)


def test_a_request_expired_before_dispatch_gives_its_section_body_back(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    name = "svc.zz.onestep.expired"
    server = spawn.argv([sys.executable, str(PEERS), "aioserve", name, "--runtime-dir", str(runtime_dir)])
    server.expect("READY")
    with alpc.connect(name, config=config, timeout=10) as client:
        server.expect("ACCEPTED")
        assert client.request(b"warm", timeout=10).data == b"ok"
        sections = client._channel.sections
        assert sections is not None
        # Past its deadline already: the server answers it CANCELLED without dispatching it.
        pending = client.start_request(b"x" * 1000, deadline=time.monotonic() - 1)
        assert sections.pool.ledger.lent_bytes() == 1000
        # Read (sending nothing: any frame of ours would make the server flush) until the
        # server's answer came.
        until = time.monotonic() + 10
        while pending.id in client._channel.pending_ids:
            assert wait_readable([client.wait_fds()[0]], until), "no answer from the server"
            client.pump()
        with pytest.raises(alpc.DeadlineExceeded):
            pending.result(timeout=5)
        assert sections.pool.ledger.lent_bytes() == 0  # the release came with the answer

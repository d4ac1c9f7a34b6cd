"""send(..., flush=False) whose queue fills up after a wait for the peer's window.

send() computes its deadline once; a datagram that finds the peer's window closed waits for a
credit until that deadline, and the retry that queues it may find the backlog over 64 KiB and
flush it. That flush was given the call's whole ``timeout`` again (``self.flush(timeout)``), not
what was left of the deadline: against a peer that stopped reading, the call lasted its window
wait plus a whole timeout more.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from local_pairs import local_connection

import alpc

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 3.0
# How much of the call's timeout the wait for the peer's window takes before a credit comes.
WINDOW_WAIT = 2.0
BIG = 70_000  # one inline datagram over the 64 KiB backlog limit: queueing it flushes at once


@pytest.fixture
def pair(broker, config) -> Iterator[tuple[alpc.CommunicationPort, alpc.CommunicationPort]]:  # type: ignore[no-untyped-def]
    """(server side, client side): the server takes 4 datagrams at most unread, and bodies up
    to 128 KiB travel inline."""
    attributes = alpc.PortAttributes(max_queued_datagrams=4, inline_threshold=128 * 1024)
    with local_connection(config, "svc.lifecycle.window", attributes) as (_, server, client):
        yield server, client


def test_queued_send_flush_keeps_to_the_calls_deadline(pair) -> None:  # type: ignore[no-untyped-def]
    server, client = pair
    # A small send buffer: the 70 KB write stays partial while the server does not read.
    client._stream._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for _ in range(4):
        client.send(b"d")  # the server's window is full: 4 datagrams unread
    took: list[alpc.Message] = []

    def take_one_late() -> None:
        # How much of the caller's timeout its wait for the window uses up; the server then stops reading.
        time.sleep(WINDOW_WAIT)  # handshake-free: this delay is the scenario, not a synchronisation
        took.append(server.receive(timeout=10))

    reader = threading.Thread(target=take_one_late, daemon=True)
    reader.start()
    started = time.monotonic()
    with pytest.raises(alpc.Timeout):
        client.send(b"x" * BIG, flush=False, timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    reader.join(10)
    assert took and took[0].data == b"d"
    # Unfixed: WINDOW_WAIT + TIMEOUT (~5 s).
    assert elapsed < TIMEOUT + 0.8, f"send(timeout={TIMEOUT}) took {elapsed:.2f} s"

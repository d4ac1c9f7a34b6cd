"""Quick-LPC beside section bodies: a release held back while a ring reply was owed."""

from __future__ import annotations

import gc
import threading

import pytest
from test_qlpc_socket_interplay import ring_pair  # tests/ is on sys.path, as for tests/test_rpc_e2e.py

import alpc
from alpc import _native

native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
pytestmark = [native, pytest.mark.timeout(60)]


def test_a_release_held_for_a_ring_reply_goes_out_with_it(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A server that released a section body while it owed a ring request its reply held the
    release back ("the reply carries it"), but a reply through the ring carries no socket
    frames: the client's section range stayed unreleased while only ring traffic followed."""
    with ring_pair(config, "zz8.rel") as (_port, server, client):
        big = b"B" * (client._core.inline_threshold + 4096)
        client.send(big)  # a datagram with a section body, over the socket
        datagram = server.receive(timeout=10)
        assert datagram.size == len(big)  # its body stays in the section until first used
        got: list[bytes] = []
        calling = threading.Thread(target=lambda: got.append(client.call(b"ring", timeout=10)))
        calling.start()
        request = server.receive(timeout=10)
        assert request.id & alpc.protocol.QUICK_ID_BIT  # it came through the ring
        assert datagram.data == big  # copied out (and released) while the ring request is owed its reply
        request.reply(b"done")
        calling.join(10)
        assert got == [b"done"]
        # Only ring traffic follows: the server answers, the client calls.
        serving = threading.Thread(target=lambda: server.serve_requests(lambda body: body, timeout=10))
        serving.start()
        try:
            for i in range(20):
                assert client.call(b"r%d" % i, timeout=10) == b"r%d" % i
            ledger = client._channel.sections.pool.ledger
            assert ledger.unreleased == 0, "the server's release never reached the client"
        finally:
            client.send(b"stop")
            serving.join(10)


def test_a_view_dropped_unreleased_is_released_before_a_ring_wait(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A received view dropped unreleased only queues its release, for the driver to send
    "before it sleeps" (port._read does); the ring waits of serve_requests() and receive()
    slept without it, so under ring-only traffic the sender's section range stayed held."""
    with ring_pair(config, "zz8.drop") as (_port, server, client):
        view = client.create_view(client._core.inline_threshold + 4096)
        view.memory[:4] = b"VIEW"
        client.send(view)
        datagram = server.receive(timeout=10)
        assert datagram.view is not None
        del datagram  # dropped unreleased: its finalizer queues the release
        gc.collect()
        serving = threading.Thread(target=lambda: server.serve_requests(lambda body: body, timeout=10))
        serving.start()
        try:
            for i in range(20):
                assert client.call(b"r%d" % i, timeout=10) == b"r%d" % i
            ledger = client._channel.sections.pool.ledger
            assert ledger.unreleased == 0, "the dropped view's release never reached the client"
        finally:
            client.send(b"stop")
            serving.join(10)

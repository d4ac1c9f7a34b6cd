"""One connection's section path used by several threads of one process.

A section reserved for views that were all released unsent was never announced to the peer.
Retiring it (``trim_sections()``, a growth making room under ``max_section_bytes``, or the
port's budget asking for idle sections) still sent SECTION_CLOSE naming it: a close of a
section the peer never heard of is a protocol error, and the peer dropped the connection.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest
from local_pairs import local_connection

import alpc

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
def _on_thread(work: Callable[[], object]) -> object:
    """``work()`` run on a thread of its own; its result (or exception) returned."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(work())
        except BaseException as exc:  # handed back to the test's thread
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert out, "the thread did not finish"
    return out[0]


def _abandon_view(client: alpc.CommunicationPort, size: int) -> None:
    """A worker thread reserves a view, then gives up on it (released, never sent)."""
    assert _on_thread(lambda: client.create_view(size, timeout=5).release()) is None


def _still_connected(receiver: alpc.CommunicationPort, sender: alpc.CommunicationPort, size: int = 100_000) -> None:
    """A datagram from ``sender`` arrives as one, not as the notice of a dropped connection."""
    body = os.urandom(size)
    sender.send(body, timeout=5)
    message = receiver.receive(timeout=5)
    assert message.type is alpc.MessageType.DATAGRAM, f"the peer dropped the connection: {message.reason}"
    assert message.data == body


def test_trim_does_not_name_a_section_the_peer_never_saw(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort]) -> None:
    """One thread abandons a view; another sends a view too large for that section (it gets a
    section of its own, and the first one, drained, is idle and was never announced); then
    the connection is trimmed. Before, the peer got SECTION_CLOSE for a section it never
    mapped and dropped the connection (CLIENT_DIED: "close of unknown section 1")."""
    server, client = local_pair
    _abandon_view(client, 100_000)

    def send_large() -> None:
        view = client.create_view(3 * MIB, timeout=5)
        view.memory[:5] = b"large"
        client.send(view, timeout=5)

    assert _on_thread(send_large) is None
    with server.receive(timeout=5).view as memory:  # type: ignore[union-attr]
        assert bytes(memory[:5]) == b"large"
    client.trim_sections(timeout=5)
    assert 1 not in client._channel.sections.pool.ledger.section_ids  # type: ignore[union-attr]
    _still_connected(server, client)


def test_a_growth_does_not_name_a_retired_section_the_peer_never_saw(
        broker: alpc.Broker, config: alpc.Config) -> None:
    """Under a max_section_bytes of two sections' worth, a thread's abandoned view leaves an
    idle, never announced section behind; another thread's large body needs the room, so the
    growth retires it. Its SECTION_CLOSE went with the body: the peer dropped the connection."""
    attributes = alpc.PortAttributes(section_size=2 * MIB, max_section_bytes=4 * MIB)
    with local_connection(config, "svc.section.threads.grow", attributes) as (_, server, client):
        _abandon_view(client, 100_000)
        body = os.urandom(3 * MIB)
        assert _on_thread(lambda: client.send(body, timeout=5)) is None
        message = server.receive(timeout=5)
        assert message.type is alpc.MessageType.DATAGRAM, f"the peer dropped the connection: {message.reason}"
        assert message.data == body
        _still_connected(server, client)

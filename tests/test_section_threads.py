"""One connection's section path used by several threads of one process.

A section reserved for views that were all released unsent was never announced to the peer.
Retiring it (``trim_sections()``, a growth making room under ``max_section_bytes``, or the
port's budget asking for idle sections) still sent SECTION_CLOSE naming it: a close of a
section the peer never heard of is a protocol error, and the peer dropped the connection.

A ``SectionView`` released (or dropped) unsent gives its range back from whatever thread
lets go of it: the range only queues, and the connection's next reservation drains the
queue. ``trim_sections()`` (and the give-back another connection asks for when the port's
``max_port_section_bytes`` is short) did not drain it, so a section whose views were all
released unsent was not idle to them: trim kept its memory, and a connection waiting for the
port's budget waited out its timeout (Throttled) while an idle connection held it.

A view one thread sends while another releases it must end up either sent or given back,
never both: a range both sent and queued as given back was freed a second time later, under
whatever view had taken it since. And a thread may release a received view of an asyncio port
whose loop has ended.
"""


from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from local_pairs import local_connection

import alpc
from alpc import aio

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20


@pytest.fixture
def local_pair(broker: alpc.Broker, config: alpc.Config) -> Iterator[tuple[alpc.CommunicationPort,
                                                                         alpc.CommunicationPort]]:
    """(server side, client side) of one connection without Quick-LPC rings: these tests are
    about sections, and a view of up to 1 MiB on a connection with rings lives in its bulk area."""
    with local_connection(config, "svc.local.sections", alpc.PortAttributes(quick_lpc=False)) as (_, server, client):
        assert not client.quick
        yield server, client


def _memfds() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:alpc-section")
        except OSError:
            pass  # the listing's own fd
    return count


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


@contextmanager
def _two_connections(config: alpc.Config, name: str, attributes: alpc.PortAttributes,
                     ) -> Iterator[list[tuple[alpc.CommunicationPort, alpc.CommunicationPort]]]:
    """(server side, client side) of two connections to one port, all in this process."""
    pairs: list[tuple[alpc.CommunicationPort, alpc.CommunicationPort]] = []
    with alpc.create_port(name, attributes, config=config) as port:
        try:
            got: list[alpc.CommunicationPort] = []
            for index in range(2):
                connecting = threading.Thread(target=lambda: got.append(alpc.connect(name, config=config, timeout=10)))
                connecting.start()
                server = port.listen(timeout=10).accept()
                connecting.join(10)
                pairs.append((server, got[index]))
            yield pairs
        finally:
            for server, client in pairs:
                client.close()
                server.close()


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


def test_trim_unmaps_a_section_whose_view_another_thread_released_unsent(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort]) -> None:
    """A worker thread reserves a view and gives up on it (released, never sent); the
    connection's own thread then trims. The section holds nothing: it must go, its memfd
    closed. Before, its range was still counted lent until the next reservation."""
    server, client = local_pair
    pool = client._channel.sections.pool  # type: ignore[union-attr]
    before = _memfds()
    view = _on_thread(lambda: client.create_view(100_000, timeout=5))
    assert isinstance(view, alpc.SectionView)
    mapped = _memfds()
    assert mapped > before and len(pool.ledger.section_ids) == 1
    assert _on_thread(view.release) is None
    client.trim_sections(timeout=5)
    assert pool.ledger.section_ids == [], "trim kept a section whose only view was released unsent"
    assert pool.ledger.total == 0 and _memfds() == before
    # The pool still works, on a thread of its own again.
    body = os.urandom(100_000)
    assert _on_thread(lambda: client.send(body, timeout=5)) is None
    assert server.receive(timeout=5).data == body


def test_a_view_dropped_unsent_does_not_keep_its_section_from_trim(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort]) -> None:
    """The same for a view a thread dropped without releasing it (its finalizer gives the
    range back)."""
    _, client = local_pair
    pool = client._channel.sections.pool  # type: ignore[union-attr]
    assert _on_thread(lambda: client.create_view(5000, timeout=5) and None) is None  # dropped there
    client.trim_sections(timeout=5)
    assert pool.ledger.section_ids == []


def test_a_view_released_unsent_on_one_connection_frees_the_port_budget_for_another(
        broker: alpc.Broker, config: alpc.Config) -> None:
    """A server thread serving one client reserves a large view and abandons it (released,
    never sent); another thread serving a second client then needs the port's section budget,
    which that idle section holds. Asked, the first connection gives back its idle sections,
    and this one is idle: the second send must go through. Before, the section did not count
    as idle, and the send waited out its timeout (Throttled: max_port_section_bytes) while
    nothing at all was in flight."""
    attributes = alpc.PortAttributes(section_size=2 * MIB, max_section_bytes=8 * MIB,
                                     max_port_section_bytes=4 * MIB)
    with _two_connections(config, "svc.section.threads.budget", attributes) as pairs:
        (first_server, first_client), (second_server, second_client) = pairs

        def abandon() -> None:
            first_server.create_view(3 * MIB, timeout=5).release()

        assert _on_thread(abandon) is None
        body = os.urandom(3 * MIB)
        outcome = _on_thread(lambda: second_server.send(body, timeout=2))
        assert outcome is None, f"the second connection's send failed: {outcome!r}"
        assert second_client.receive(timeout=5).data == body
        # The first connection's idle section was never announced: giving it back tells its
        # client nothing (a close of an unknown section dropped that connection).
        # (Inline: the budget is the second connection's until its server reads the release.)
        _still_connected(first_client, first_server, 100)


def test_a_view_released_while_another_thread_sends_it_is_given_back_at_most_once(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort], monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread S sends a view while thread R releases it. Either the send is refused (released
    first) or the release does nothing (sent first). Before, S could check "not released",
    R then see "not sent" and queue the range as given back, and S send it anyway: once the
    peer released it and a new view D took the same range, the stale give-back freed D's
    range, and the next view overlapped D (two writers, one range: corrupted bodies).
    Paused by hooks at those two points (S after its check, R before it queues the range);
    where the code leaves no such gap, the hooks are simply never reached."""
    server, client = local_pair
    pool = client._channel.sections.pool  # type: ignore[union-attr]
    view = client.create_view(1000, timeout=5)
    view.memory[:] = b"s" * 1000
    sender_checked, releaser_queued, go_on = threading.Event(), threading.Event(), threading.Event()
    real_released = alpc.SectionView.released
    real_give_back = pool.give_back

    def released(self: alpc.SectionView) -> bool:
        answer = real_released.fget(self)  # type: ignore[attr-defined]
        if threading.current_thread().name == "sender" and not sender_checked.is_set():
            sender_checked.set()
            assert releaser_queued.wait(10)
        return bool(answer)

    def give_back(slot: object) -> None:
        if threading.current_thread().name == "releaser":
            releaser_queued.set()
            assert go_on.wait(10)
        real_give_back(slot)  # type: ignore[arg-type]

    monkeypatch.setattr(alpc.SectionView, "released", property(released))
    monkeypatch.setattr(pool, "give_back", give_back)
    outcome: list[object] = []

    def send() -> None:
        try:
            client.send(view, timeout=5)
            outcome.append("sent")
        except alpc.SectionError as exc:
            outcome.append(exc)
        finally:
            sender_checked.set()  # no gap to pause in: sent (or refused) already

    def release() -> None:
        try:
            view.release()
        finally:
            releaser_queued.set()

    sender = threading.Thread(target=send, name="sender")
    releaser = threading.Thread(target=release, name="releaser")
    sender.start()
    try:
        assert sender_checked.wait(10)
        releaser.start()
        assert releaser_queued.wait(10)
        sender.join(10)
        assert outcome, "the send did not finish"
        if outcome == ["sent"]:
            with server.receive(timeout=5).view as memory:  # type: ignore[union-attr]
                assert bytes(memory) == b"s" * 1000
            # The release went out before this reply: the client has read it on return.
            server_reply = threading.Thread(target=lambda: server.reply(server.receive(timeout=5), b"ok"))
            server_reply.start()
            assert client.request(b"sync", timeout=5).data == b"ok"
            server_reply.join(10)
        taken = client.create_view(1000, timeout=5)  # the range the first view had, free again
    finally:
        go_on.set()
        releaser.join(10)
        sender.join(10)
    try:
        taken.memory[:] = b"d" * 1000
        other = client.create_view(1000, timeout=5)
        try:
            assert (other.section_id, other.offset) != (taken.section_id, taken.offset), \
                "two live views were handed the same range"
        finally:
            other.release()
    finally:
        taken.release()


def test_a_thread_releases_a_view_of_an_asyncio_port_whose_loop_ended(broker: alpc.Broker,
                                                                      config: alpc.Config) -> None:
    """An asyncio port's received view, handed to a thread that releases it after the port's
    loop ended (the port still open): release() raised RuntimeError("Event loop is closed")
    from the call that schedules telling the peer, out of a ``with message.view`` block too,
    though the range was given back already. A view dropped unreleased in the same state was
    quiet (its hook caught that); a release must be too."""
    name = "svc.section.threads.aio"
    with alpc.create_port(name, config=config) as port:
        accepted: list[alpc.CommunicationPort] = []

        def serve() -> None:
            server = port.listen(timeout=10).accept()
            accepted.append(server)
            view = server.create_view(5000, timeout=5)
            view.memory[:5] = b"hello"
            server.send(view, timeout=5)

        async def receive() -> tuple[aio.AsyncCommunicationPort, alpc.Message]:
            comm = await aio.connect(name, config=config, timeout=10)
            return comm, await comm.receive(timeout=5)

        serving = threading.Thread(target=serve)
        serving.start()
        comm, message = asyncio.run(receive())
        serving.join(10)
        try:
            assert message.view is not None

            def read_and_release() -> bytes:
                with message.view as memory:  # type: ignore[union-attr]
                    return bytes(memory[:5])

            assert _on_thread(read_and_release) == b"hello"
            assert message.view.released
        finally:
            asyncio.run(comm.close())
            for server in accepted:
                server.close()

"""Views in the Quick-LPC bulk areas under races and signals: whatever another thread or a
signal handler does between the C calls, the area's loan ends, a held view of the peer's
area is given back, and a reply stays owed until it goes.

Signals are simulated as in test_qlpc_bulk.py and test_qlpc_socket_interplay.py: a wrapper
raises KeyboardInterrupt as the C call returns, which is where CPython runs a pending signal
handler. Another thread's action during a C call (which runs with the GIL released) is
simulated the same way, inside the wrapped call. Each test failed before its fix.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import alpc
from alpc._native import QuickRing
from alpc.qlpc import QuickLink
from tests.test_qlpc_bulk import native
from tests.test_qlpc_socket_interplay import ring_pair

pytestmark = [native, pytest.mark.timeout(60)]


@pytest.fixture
def pair(broker, config) -> Iterator[tuple[alpc.CommunicationPort, alpc.CommunicationPort]]:  # type: ignore[no-untyped-def]
    with ring_pair(config, "viewraces.local", alpc.PortAttributes(quick_lpc=True)) as (_, server, client):
        assert client.quick
        yield server, client


def refused_view(client: alpc.CommunicationPort) -> tuple[QuickLink, alpc.RingView]:
    """The client's link and a filled view lent by its bulk area, whose ring post will be
    refused for now (Q_ORDER): a datagram's socket bytes go unread before it."""
    quick = client._quick
    assert quick is not None
    client.send(b"datagram", timeout=10)
    view = client.create_view(10, timeout=10)
    assert isinstance(view, alpc.RingView)
    view.memory[:] = b"0123456789"
    return quick, view


def test_a_release_during_a_refused_ring_post_ends_the_loan(pair) -> None:  # type: ignore[no-untyped-def]
    """A RingView released by another thread while this one is in the ring post, which the ring
    refuses (Q_ORDER: a datagram's socket bytes are not read yet): the release saw the view
    claimed (sent) and gave nothing back; _post_view then unclaims it, because the loan is still
    in force. Nobody can unlend it now (the view is released): the area stays lent for ever, so
    no later view is lent and no large copy goes through the ring."""
    _, client = pair
    quick, view = refused_view(client)
    real = quick._call_attested

    def released_meanwhile(*args: object) -> int:
        view.release()  # another thread, while this one is in the C call (GIL released)
        return real(*args)

    quick._call_attested = released_meanwhile  # type: ignore[method-assign]
    try:
        with pytest.raises(alpc.SectionError):
            client.request(view, timeout=10)
    finally:
        quick._call_attested = real  # type: ignore[method-assign]
    assert view.released
    assert not quick.ring.loan_in_force(view.loan), "a released view's loan is still in force"
    again = client.create_view(10, timeout=10)
    lent = isinstance(again, alpc.RingView)
    again.release()
    assert lent, "the bulk area never comes back"


def test_an_interrupt_as_the_area_is_lent_ends_the_loan(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A signal handler raising as lend_bulk returns (QuickLink.lend, before the loan number is
    stored anywhere): the area stays lent for ever; create_view never lends it again."""
    _, client = pair
    quick = client._quick
    assert quick is not None
    real = QuickRing.lend_bulk
    loans: list[int] = []

    def interrupted(ring: QuickRing, loan: int) -> int:
        loans.append(real(ring, loan))
        raise KeyboardInterrupt  # as a signal handler would, as the C call returns

    monkeypatch.setattr(QuickRing, "lend_bulk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.create_view(100, timeout=10)
    monkeypatch.undo()
    assert loans and loans[0] > 0
    view = client.create_view(100, timeout=10)
    lent = isinstance(view, alpc.RingView)
    view.release()
    assert lent, "the bulk area stays lent to a view nobody has"


def test_an_interrupt_as_the_client_takes_a_reply_view_gives_the_area_back(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A signal handler raising as the client's take_view returns (QuickLink._call_slow): the
    C side set the client's bulk_held, but no View was made, and _call_slow's handler abandons
    the call without releasing it (the server's _rescue does that work for requests; the
    client has nothing like it). The server's bulk area is held for ever: no view of its is
    lent again, and no large reply goes through the ring."""
    server, client = pair
    squick, cquick = server._quick, client._quick
    assert squick is not None and cquick is not None
    real = QuickRing.take_view
    taken: list[int] = []

    def interrupted(ring: QuickRing) -> int:
        status = real(ring)
        if ring is cquick.ring and not taken:
            taken.append(status)
            raise KeyboardInterrupt  # as a signal handler would, as the C call returns
        return status

    def serve() -> None:
        message = server.receive(timeout=10)
        answer = server.create_view(70_000, timeout=10)
        assert isinstance(answer, alpc.RingView)
        answer.memory[:] = b"r" * 70_000
        message.reply(answer)

    monkeypatch.setattr(QuickRing, "take_view", interrupted)
    serving = threading.Thread(target=serve)
    serving.start()
    with pytest.raises(KeyboardInterrupt):
        client.request(b"question", timeout=10)
    serving.join(10)
    monkeypatch.undo()
    assert taken == [70_000]  # the client took the reply as a view, and then the signal came
    # The server's area: free again for a view once nothing of the client holds it.
    view = server.create_view(70_000, timeout=10)
    lent = isinstance(view, alpc.RingView)
    view.release()
    assert lent, "the client holds the server's bulk area for ever"


def test_an_interrupt_before_a_refused_post_is_settled_leaves_the_loan_to_the_release(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """_post_view's finally asks the C side whether the loan is still in force, then unclaims the
    view. A signal handler raising as loan_in_force returns (the post refused: Q_ORDER) leaves
    the view claimed ("sent") with its loan in force: released afterwards it gives nothing back
    (RingView._finished unlends only an unsent view), and the area stays lent for ever."""
    _, client = pair
    _, view = refused_view(client)
    real = QuickRing.loan_in_force
    raised: list[bool] = []

    def interrupted(ring: QuickRing, loan: int) -> bool:
        in_force = real(ring, loan)
        if not raised:
            raised.append(in_force)
            raise KeyboardInterrupt  # as a signal handler would, as the C call returns
        return in_force

    monkeypatch.setattr(QuickRing, "loan_in_force", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.request(view, timeout=10)
    monkeypatch.undo()
    assert raised == [True]  # the ring refused the post: the loan was still the view's
    view.release()
    again = client.create_view(10, timeout=10)
    lent = isinstance(again, alpc.RingView)
    again.release()
    assert lent, "the bulk area stays lent to a released view"


def test_a_view_reply_whose_claim_another_thread_wins_stays_owed(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Another thread sends the view a reply is about to post (simulated: its claim comes first,
    as reply() claims it): the reply() raises SectionError and the reply is still owed, so the
    application's next reply goes. (The claim once came only after the reply was taken off the
    owed list: the next reply was refused, "not a request awaiting a reply", and the client
    never got one.)"""
    server, client = pair
    replies: list[bytes] = []
    failures: list[BaseException] = []

    def ask() -> None:
        try:
            replies.append(client.request(b"q", timeout=5).data)
        except BaseException as exc:
            failures.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    message = server.receive(timeout=10)
    view = server.create_view(4, timeout=10)
    assert isinstance(view, alpc.RingView)
    view.memory[:] = b"view"
    real = alpc.RingView.claim
    raced: list[bool] = []

    def claimed_first(self: alpc.RingView) -> None:
        if not raced:
            raced.append(True)
            real(self)  # the other thread's send takes it
        real(self)

    monkeypatch.setattr(alpc.RingView, "claim", claimed_first)
    with pytest.raises(alpc.SectionError):
        message.reply(view)
    monkeypatch.undo()
    assert raced
    message.reply(b"answer")  # still owed: the first reply never went
    asking.join(10)
    assert failures == [] and replies == [b"answer"]


def test_a_received_ring_view_is_read_only_through_its_exporter_too(pair) -> None:  # type: ignore[no-untyped-def]
    """A received view's memory is read-only, but its ``obj`` is the mmap object map_placed made:
    an anonymous read-write mmap whose pages qlpc_map_bulk replaced with the peer's area,
    mprotected PROT_READ. Python still thinks it writable: ``view.memory.obj[0] = 0`` (or a
    numpy array over it) kills the process with SIGSEGV, where a section's view (an mmap made
    PROT_READ) raises TypeError."""
    server, client = pair

    def serve() -> None:
        message = server.receive(timeout=10)
        answer = server.create_view(5000, timeout=10)
        answer.memory[:] = b"r" * 5000
        message.reply(answer)

    serving = threading.Thread(target=serve)
    serving.start()
    reply = client.request(b"q", timeout=10)
    serving.join(10)
    assert reply.view is not None and reply.view.readonly
    exporter = reply.view.memory.obj
    try:
        with memoryview(exporter) as buffer:
            writable = not buffer.readonly
    finally:
        del exporter
        reply.view.release()
    assert not writable, "a writable buffer over the peer's PROT_READ bulk area: a write segfaults"


def test_a_large_buffer_reply_to_a_ring_request_is_not_copied_first(pair) -> None:  # type: ignore[no-untyped-def]
    """port.reply's ring test calls _ring_body (bytes(data) for a bytearray or memoryview) before
    it checks the length against carry_max: a reply far larger than the rings carry (it goes by
    a section anyway) is first copied whole into a new bytes object, for nothing. (Before the
    views commit the length was checked first.)"""
    import tracemalloc

    server, client = pair
    size = 8 << 20
    body = bytearray(size)
    replies: list[int] = []
    asking = threading.Thread(target=lambda: replies.append(client.request(b"q", timeout=10).view is not None))
    asking.start()
    message = server.receive(timeout=10)
    assert message.id & alpc.protocol.QUICK_ID_BIT  # a ring request
    tracemalloc.start()
    try:
        message.reply(memoryview(body), timeout=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        asking.join(10)
    assert replies
    assert peak < size // 2, f"{peak} bytes allocated to reply with an {size}-byte buffer by the socket"


def test_create_view_racing_close_raises_connection_closed(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Another thread closing the port while create_view lends the bulk area (after lend_bulk,
    before the RingView maps it): BulkAreas.close dropped the mapping, and RingView's
    acquire raises SectionError("the section is unmapped"), where create_view on a closed
    port raises ConnectionClosed."""
    _, client = pair
    real = QuickRing.lend_bulk

    def closed_meanwhile(ring: QuickRing, number: int) -> int:
        loan = real(ring, number)
        client.close()  # another thread, as this one returns from the C call
        return loan

    monkeypatch.setattr(QuickRing, "lend_bulk", closed_meanwhile)
    with pytest.raises(alpc.ConnectionClosed):
        client.create_view(100, timeout=10)
    monkeypatch.undo()
    with pytest.raises(alpc.ConnectionClosed):  # what a closed port says
        client.create_view(100, timeout=10)


def test_a_ring_view_whose_copy_into_a_section_fails_can_be_sent_again(pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A RingView sent where the rings never go (a datagram) is copied into a section; when no
    section space comes in time (Throttled), the view stays the caller's, to send again, as a
    section's view does. (It was released with the failure, its bytes lost.)"""
    server, client = pair
    view = client.create_view(100, timeout=10)
    assert isinstance(view, alpc.RingView)
    view.memory[:] = b"v" * 100
    real = alpc.CommunicationPort._reserve

    def no_space(self, length, secure, deadline):  # type: ignore[no-untyped-def]
        raise alpc.Throttled("no section space in time")

    monkeypatch.setattr(alpc.CommunicationPort, "_reserve", no_space)
    with pytest.raises(alpc.Throttled):
        client.send(view, timeout=10)
    monkeypatch.setattr(alpc.CommunicationPort, "_reserve", real)
    assert not view.released and not view.sent
    client.send(view, timeout=10)
    message = server.receive(timeout=10)
    assert message.type is alpc.MessageType.DATAGRAM and message.data == b"v" * 100
    assert view.released and not client._quick.ring.loan_in_force(view.loan)  # copied: the area is free

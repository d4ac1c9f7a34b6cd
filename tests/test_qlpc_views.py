"""Zero-copy views through the rings' bulk areas: ``create_view`` on a connection with
Quick-LPC lends the caller its side's bulk area, a request or reply publishes it in place,
and the receiver maps the sender's area read-only; with real processes where the view
crosses one, and in one process for the API's rules.

(The C calls themselves, lend / post in place / take_view / release, and a hostile peer's
view entries, are in test_qlpc_ring.py and the ASan driver.)
"""

from __future__ import annotations

import os
import queue
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import alpc
from tests.test_qlpc import Start, connect, peer_starter, shm_names_of
from tests.test_qlpc_bulk import BULK, body_of, native, sections_made
from tests.test_qlpc_socket_interplay import ring_pair
from tests.test_quick_identity import RING_MEMFD, bulk_lines, fd_targets

pytestmark = [native, pytest.mark.timeout(60)]


@pytest.fixture
def peer(spawn, runtime_dir: Path) -> Start:  # type: ignore[no-untyped-def]
    return peer_starter(spawn, runtime_dir)

def filled(comm: alpc.CommunicationPort, body: bytes) -> alpc.SectionView:
    view = comm.create_view(len(body), timeout=10)
    view.memory[:] = body
    return view


def warm(comm: alpc.CommunicationPort) -> None:
    # (The first posts may find the server in poll(): the doorbell, then the socket once.)
    for _ in range(3):
        comm.call(b"warm", timeout=10)


@pytest.mark.parametrize("mode", ["receive", "wait"])
def test_views_go_both_ways_through_the_bulk_areas(broker, config, peer, mode: str) -> None:  # type: ignore[no-untyped-def]
    """A request sent as a view comes to the server as a read-only view, its reply (a view the
    server filled) to the client as one: every byte through the ring counts, no section made
    on either side, and the areas come back for the next view."""
    server = peer("server", f"qv.both.{mode}", "--mode", mode)
    with connect(config, f"qv.both.{mode}") as comm:
        quick = comm._quick
        assert comm.quick and quick is not None
        warm(comm)
        before = quick.ring.counts()
        mapped = len(bulk_lines("/proc/self/maps"))  # (the connection maps its areas on first use)
        sizes = (1, quick.payload_max + 1, 65536, BULK)
        for size in sizes:
            body = body_of(size)
            view = filled(comm, body)
            assert isinstance(view, alpc.RingView) and not view.readonly
            reply = comm.request(view, timeout=10)
            assert view.released  # posted in place: the memory is the server's to read now
            assert reply.view is not None and reply.view.readonly
            with reply.view as memory:
                assert bytes(memory) == body.upper()
            assert server.expect("VIEWED")[:2] == [str(size), "True"]
        after = quick.ring.counts()
        assert after["bytes_out"] - before["bytes_out"] == sum(sizes)
        assert after["bytes_in"] - before["bytes_in"] == sum(sizes)
        assert sections_made(comm) == []
        # Both areas mapped again here, for the views sent and received, and no fd kept for it.
        assert len(bulk_lines("/proc/self/maps")) == mapped + 2
        assert not [target for target in fd_targets("self") if target.startswith(RING_MEMFD)]
        assert comm.request(b"x", timeout=10).data == b"X"
        # (The server's last VIEWED said how many sections it made: checked below, after all.)
        view = filled(comm, b"last")
        assert comm.request(view, timeout=10).view is not None
        assert server.expect("VIEWED") == ["4", "True", "0"]


def test_a_lean_server_gets_a_view_request_as_bytes(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """serve_requests() hands its handler bytes: a request written in place is copied out,
    and the client's area is free at once for the next view."""
    peer("server", "qv.serve", "--mode", "serve")
    with connect(config, "qv.serve") as comm:
        warm(comm)
        for size in (10, 65536, BULK):
            body = body_of(size)
            view = filled(comm, body)
            assert isinstance(view, alpc.RingView)
            assert comm.request(view, timeout=10).data == body.upper()
        assert sections_made(comm) == []


def test_a_view_the_server_holds_keeps_the_area_until_it_releases(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """While the server holds the client's last view, the client's next view takes a section
    (the area is the server's to read), and the ring area comes back once it lets go."""
    peer("server", "qv.hold", "--mode", "receive")
    with connect(config, "qv.hold") as comm:
        warm(comm)
        kept = filled(comm, b"keep:" + body_of(70_000))
        assert isinstance(kept, alpc.RingView)
        assert comm.request(kept, timeout=10).data == b"kept"
        second = filled(comm, body_of(5000))
        assert not isinstance(second, alpc.RingView)
        reply = comm.request(second, timeout=10)
        assert reply.view is not None and reply.view.tobytes() == body_of(5000).upper()
        reply.view.release()
        assert sections_made(comm) != []
        # A copy too large for a slot cannot take the held area either: the socket carries it.
        body = body_of(100_000)
        assert comm.call(body, timeout=10) == body.upper()
        assert comm.request(b"free", timeout=10).data == b"freed"
        third = filled(comm, body_of(3000))
        assert isinstance(third, alpc.RingView)
        assert comm.request(third, timeout=10).view is not None


def test_a_view_sent_as_a_datagram_is_copied_into_a_section(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """The rings carry no datagrams: a view in the bulk area sent as one arrives as a view of
    a section, with the same bytes. Views are then made in sections (a producer of datagrams
    would otherwise pay that copy for each), until one goes as a request again."""
    peer("server", "qv.datagram", "--mode", "receive")
    with connect(config, "qv.datagram") as comm:
        warm(comm)
        view = filled(comm, b"datagram-view")
        assert isinstance(view, alpc.RingView)
        comm.send(view, timeout=10)
        assert view.released
        assert comm.request(b"order", timeout=10).data.endswith(b"D:datagram-view")
        second = filled(comm, b"second-datagram")
        assert not isinstance(second, alpc.RingView)
        comm.send(second, timeout=10)
        as_request = filled(comm, b"a request")
        assert not isinstance(as_request, alpc.RingView)
        assert comm.request(as_request, timeout=10).view is not None
        again = filled(comm, b"next")
        assert isinstance(again, alpc.RingView)
        assert comm.request(again, timeout=10).view is not None
        assert comm.request(b"order", timeout=10).data.endswith(b"order D:second-datagram")


def test_views_after_datagrams_stay_views_and_stay_lent(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """A view request right after a datagram may find the ring refusing it for the moment
    (behind the datagram's socket bytes): it goes by the socket, still a view at the server,
    and the next view is lent from the bulk area again (only a view sent where the rings never
    go sends later ones to sections). Fresh connections: the first requests of each too."""
    server = peer("server", "qv.socketwait", "--mode", "receive")
    for turn in range(5):
        with connect(config, "qv.socketwait") as comm:
            server.expect("ACCEPTED")
            for step in range(4):
                if step % 2:
                    comm.send(b"d%d" % step, timeout=10)
                view = filled(comm, body_of(5000))
                # (Lent every time: a ring that refused the last one for the moment, behind the
                # datagram's socket bytes, does not send views to sections.)
                assert isinstance(view, alpc.RingView), f"connection {turn}, step {step}"
                reply = comm.request(view, timeout=10)
                assert reply.view is not None, f"connection {turn}, step {step}: the server got no view"
                reply.view.release()
                server.expect("VIEWED")


@pytest.mark.parametrize("victim", ["client", "server"])
def test_sigkill_while_a_view_is_held_leaves_nothing(broker, config, peer, victim: str) -> None:  # type: ignore[no-untyped-def]
    """A client killed while the server holds its view (or the server killed while the client
    holds the server's reply view): the survivor reads on with no crash and no leak, and
    nothing of either is left in /dev/shm."""
    if victim == "client":
        server = peer("server", "qv.kill", "--mode", "receive")
        client = peer("client", "qv.kill")
        client.send("view keep:" + "k" * 5000)
        assert client.expect("VIEW") == ["True"]
        assert client.expect("VIEWREPLY") == ["kept"]
        client.kill()
        assert server.expect("HELD") == ["1", "True"]
        assert server.expect("CLIENT_DIED")[0] == str(client.pid)
        with connect(config, "qv.kill") as comm:  # and it serves on
            warm(comm)
            assert comm.request(filled(comm, b"again"), timeout=10).view is not None
        assert shm_names_of(client.pid, int(server.ready[0])) == []
        return
    server = peer("server", "qv.killserver", "--mode", "receive")
    with connect(config, "qv.killserver") as comm:
        warm(comm)
        reply = comm.request(filled(comm, b"abc" * 1000), timeout=10)
        server.expect("VIEWED")
        assert reply.view is not None
        os.kill(server.pid, signal.SIGKILL)
        with pytest.raises(alpc.AlpcError):
            while True:
                comm.request(b"x", timeout=10)
        assert reply.view.tobytes() == b"ABC" * 1000
        reply.view.release()
    assert shm_names_of(server.pid) == []


# -- the API's rules, in one process ---------------------------------------------


@pytest.fixture
def pair(broker, config) -> Iterator[tuple[alpc.CommunicationPort, alpc.CommunicationPort]]:  # type: ignore[no-untyped-def]
    with ring_pair(config, "qv.local", alpc.PortAttributes(quick_lpc=True)) as (_, server, client):
        assert client.quick
        yield server, client


def test_one_view_at_a_time_lives_in_the_area(pair) -> None:  # type: ignore[no-untyped-def]
    """The area is lent to one view: a second one, a secure one or one over 1 MiB is a
    section's; releasing the lent view unsent gives the area back."""
    _, client = pair
    first = client.create_view(100, timeout=10)
    assert isinstance(first, alpc.RingView)
    for other in (client.create_view(100, timeout=10), client.create_view(100, secure=True, timeout=10),
                  client.create_view(BULK + 1, timeout=10)):
        assert not isinstance(other, alpc.RingView)
        other.release()
    first.release()
    with client.create_view(100, timeout=10) as memory:
        assert len(memory) == 100 and not memory.readonly
    assert isinstance(client.create_view(100, timeout=10), alpc.RingView)  # (dropped: its finaliser gives it back)


def test_a_view_cannot_be_sent_twice_or_after_release(pair) -> None:  # type: ignore[no-untyped-def]
    server, client = pair
    answered = threading.Thread(target=lambda: server.receive(timeout=10).reply(b"ok"))
    answered.start()
    view = client.create_view(10, timeout=10)
    view.memory[:] = b"0123456789"
    assert client.request(view, timeout=10).data == b"ok"
    answered.join(10)
    with pytest.raises(alpc.SectionError):
        client.request(view, timeout=10)
    unsent = client.create_view(10, timeout=10)
    unsent.release()
    with pytest.raises(alpc.SectionError):
        client.send(unsent, timeout=10)
    with pytest.raises(alpc.SectionError):
        client.request(client.create_view(10, timeout=10), secure=True, timeout=10)
    assert isinstance(client.create_view(10, timeout=10), alpc.RingView)


def test_a_view_of_another_connection_is_refused(broker, config, pair) -> None:  # type: ignore[no-untyped-def]
    _, client = pair
    with ring_pair(config, "qv.other", alpc.PortAttributes(quick_lpc=True)) as (_, _, other):
        view = other.create_view(10, timeout=10)
        assert isinstance(view, alpc.RingView)
        with pytest.raises(alpc.SectionError, match="another connection"):
            client.send(view, timeout=10)
        view.release()


def test_a_received_view_outlives_its_connection(pair) -> None:  # type: ignore[no-untyped-def]
    """Both ends closed while the server still holds the client's view: the view reads on
    (its mapping is counted), and its release afterwards is harmless."""
    server, client = pair
    got: list[alpc.Message] = []
    receiving = threading.Thread(target=lambda: got.append(server.receive(timeout=10)))
    receiving.start()
    view = client.create_view(4096, timeout=10)
    view.memory[:] = b"v" * 4096
    with pytest.raises(alpc.AlpcError):
        # Nobody answers: the client gives up; then both ends close.
        client.request(view, timeout=0.5)
    receiving.join(10)
    (message,) = got
    assert message.view is not None and message.view.readonly
    client.close()
    server.close()
    assert message.view.tobytes() == b"v" * 4096
    message.view.release()


def test_a_server_replies_with_a_view_through_the_ring(pair) -> None:  # type: ignore[no-untyped-def]
    server, client = pair

    def serve() -> None:
        message = server.receive(timeout=10)
        reply = server.create_view(70_000, timeout=10)
        assert isinstance(reply, alpc.RingView)
        reply.memory[:] = message.data * 7000
        message.reply(reply)

    serving = threading.Thread(target=serve)
    serving.start()
    reply = client.request(b"0123456789", timeout=10)
    serving.join(10)
    assert reply.view is not None and reply.view.readonly
    assert reply.data == b"0123456789" * 7000  # (data copies the view)
    reply.view.release()
    assert sections_made(server) == []


def test_a_view_sent_by_a_call_that_skips_the_rings_is_copied_once(pair) -> None:  # type: ignore[no-untyped-def]
    """start_request() (and a request with a deadline, which is one) does not take the rings: a
    view lent by the area is copied into a section and arrives as a view; the next views are a
    section's, until one is sent by a call the rings could have carried it in."""
    server, client = pair
    views: list[bytes] = []

    def serve(count: int) -> None:
        for _ in range(count):
            message = server.receive(timeout=10)
            assert message.view is not None
            views.append(message.view.tobytes())
            message.view.release()
            message.reply(b"ok")

    serving = threading.Thread(target=serve, args=(4,))
    serving.start()
    lent = client.create_view(5, timeout=10)
    lent.memory[:] = b"first"
    assert isinstance(lent, alpc.RingView)
    assert client.start_request(lent, timeout=10).result(10).data == b"ok"
    second = client.create_view(6, timeout=10)
    second.memory[:] = b"second"
    assert not isinstance(second, alpc.RingView)
    assert client.request(second, deadline=time.monotonic() + 60, timeout=10).data == b"ok"  # (no ring: still sections)
    third = client.create_view(5, timeout=10)
    third.memory[:] = b"third"
    assert not isinstance(third, alpc.RingView)
    assert client.request(third, timeout=10).data == b"ok"  # the ring could have: lend again
    fourth = client.create_view(6, timeout=10)
    fourth.memory[:] = b"fourth"
    assert isinstance(fourth, alpc.RingView)
    assert client.request(fourth, timeout=10).data == b"ok"
    serving.join(10)
    assert views == [b"first", b"second", b"third", b"fourth"]


def test_a_reader_that_takes_the_ring_from_the_general_path_gets_a_view(pair) -> None:  # type: ignore[no-untyped-def]
    """Two threads receive: one waits on the ring, the other behind it, and reads next through
    the port's general path (which waits on the ring and the socket together). A view request
    taken there is a view as well, not a copy (it was: the first request of a connection, read
    so while the client had not attached yet, came without one)."""
    server, client = pair
    seen: list[bytes | None] = []

    def take_one() -> None:
        message = server.receive(timeout=10)
        view = message.view
        seen.append(None if view is None else view.tobytes())
        if view is not None:
            view.release()
        message.reply(b"ok")

    takers = [threading.Thread(target=take_one) for _ in range(2)]
    for taker in takers:
        taker.start()
    ready = threading.Event()
    for _ in range(10_000):  # the handshake: one thread reads, the other waits behind it
        if server._reading and server._waiters:
            break
        ready.wait(0.001)
    else:
        pytest.fail("the two receivers never both waited")
    for body in (b"one", b"two"):
        view = client.create_view(len(body), timeout=10)
        view.memory[:] = body
        assert isinstance(view, alpc.RingView)
        assert client.request(view, timeout=10).data == b"ok"
    for taker in takers:
        taker.join(10)
    assert sorted(seen, key=repr) == [b"one", b"two"]


def test_a_view_the_ring_refuses_for_now_leaves_views_lent(pair) -> None:  # type: ignore[no-untyped-def]
    """Another thread's ring call in flight sends a view request by the socket (copied into a
    section, a view at the server): only for now, the next view is lent again."""
    server, client = pair
    first_in = threading.Event()
    views: list[bytes] = []

    def serve() -> None:
        first = server.receive(timeout=10)
        first_in.set()
        second = server.receive(timeout=10)
        assert second.view is not None
        views.append(second.view.tobytes())
        second.view.release()
        second.reply(b"second")
        first.reply(b"first")

    serving = threading.Thread(target=serve)
    serving.start()
    replies: list[bytes] = []
    in_flight = threading.Thread(target=lambda: replies.append(client.request(b"a", timeout=10).data))
    in_flight.start()
    assert first_in.wait(10)
    view = client.create_view(4, timeout=10)
    view.memory[:] = b"view"
    assert isinstance(view, alpc.RingView)
    assert client.request(view, timeout=10).data == b"second"
    in_flight.join(10)
    serving.join(10)
    assert replies == [b"first"] and views == [b"view"]
    again = client.create_view(4, timeout=10)
    assert isinstance(again, alpc.RingView)
    again.release()


def test_replying_with_a_spent_view_raises_and_leaves_the_reply_owed(pair) -> None:  # type: ignore[no-untyped-def]
    server, client = pair
    replies: list[bytes] = []
    asking = threading.Thread(target=lambda: replies.append(client.request(b"q", timeout=10).data))
    asking.start()
    message = server.receive(timeout=10)
    spent = server.create_view(4, timeout=10)
    assert isinstance(spent, alpc.RingView)
    spent.release()
    with pytest.raises(alpc.SectionError):
        message.reply(spent)
    message.reply(b"answer")  # still owed: the first reply never went
    asking.join(10)
    assert replies == [b"answer"]


def test_threads_mixing_views_copies_and_datagrams_both_ways(pair) -> None:  # type: ignore[no-untyped-def]
    """Four client threads send views (lent or a section's), bytes and datagrams of every size;
    two server threads answer with views or bytes, and a third thread releases some received
    views late. Every reply is its request's; none is lost or sent twice. (A view posted in
    place while another thread took the next loan was once sent a second time.)"""
    server, client = pair
    sizes = [1, 100, 481, 5000, 65536, 300_000, BULK, BULK + 1]
    late: queue.Queue[alpc.View | None] = queue.Queue()
    failures: list[BaseException] = []

    def release_late() -> None:
        while (view := late.get(timeout=30)) is not None:
            view.release()

    def keep_or_release(view: alpc.View | None, rng: random.Random) -> None:
        if view is not None and rng.random() < 0.3:
            late.put(view)
        elif view is not None:
            view.release()

    def serve(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while (message := server.receive(timeout=10)).type is not alpc.MessageType.PORT_CLOSED:
                data = message.data
                keep_or_release(message.view, rng)
                if message.type is not alpc.MessageType.REQUEST:
                    continue
                if data == b"stop":
                    message.reply(b"stopped")
                    return
                if rng.random() < 0.5:
                    answer = server.create_view(len(data), timeout=10)
                    answer.memory[:] = data[::-1]
                    message.reply(answer)
                else:
                    message.reply(data[::-1])
        except BaseException as exc:
            failures.append(exc)

    def ask(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for turn in range(40):
                size = rng.choice(sizes)
                body = bytes([seed, turn]) * (size // 2) + b"!" * (size % 2)
                roll = rng.random()
                if roll < 0.15:
                    client.send(body, timeout=20)
                    continue
                if roll < 0.7:
                    view = client.create_view(size, timeout=20)
                    view.memory[:] = body
                    reply = client.request(view, timeout=20)
                else:
                    reply = client.request(body, timeout=20)
                assert reply.data == body[::-1], f"thread {seed}, turn {turn}: {len(reply.data)} bytes for {size}"
                keep_or_release(reply.view, rng)
        except BaseException as exc:
            failures.append(exc)

    releaser = threading.Thread(target=release_late)
    servers = [threading.Thread(target=serve, args=(seed,)) for seed in (1, 2)]
    clients = [threading.Thread(target=ask, args=(seed,)) for seed in (11, 12, 13, 14)]
    for thread in [releaser, *servers, *clients]:
        thread.start()
    for thread in clients:
        thread.join(60)
    for _ in servers:
        assert client.request(b"stop", timeout=20).data == b"stopped"
    for thread in servers:
        thread.join(20)
    late.put(None)
    releaser.join(20)
    assert not any(thread.is_alive() for thread in [releaser, *servers, *clients])
    assert failures == []

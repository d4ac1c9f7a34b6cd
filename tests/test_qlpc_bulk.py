"""Bodies too large for a ring slot, up to 1 MiB, through the rings' bulk areas, with real
processes: both directions on every server loop, no section needed for them, the receiver's
max_message_length kept, the socket for anything larger, and SIGKILL mid-transfer.

(The ring calls themselves, and what a hostile peer writes in a bulk entry, are in
test_qlpc_ring.py; a hostile peer's oversized bulk entry across processes in test_qlpc.py.)
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import alpc
from alpc import _native
from alpc._native import QuickRing
from tests.test_qlpc import PROMPT, Start, connect, peer_starter, shm_names_of
from tests.test_qlpc_socket_interplay import ring_pair

native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
pytestmark = [native, pytest.mark.timeout(60)]

BULK = _native.QUICK_DEFAULTS["bulk_size"]


@pytest.fixture
def peer(spawn, runtime_dir: Path) -> Start:  # type: ignore[no-untyped-def]
    return peer_starter(spawn, runtime_dir)


def body_of(size: int) -> bytes:
    return bytes(range(97, 123)) * (size // 26) + b"q" * (size % 26)


def sections_made(comm: alpc.CommunicationPort) -> list[int]:
    sections = comm._channel.sections
    assert sections is not None
    return list(sections.pool.ledger.section_ids)


@pytest.mark.parametrize("mode", ["serve", "receive"])
def test_large_requests_and_replies_take_the_bulk_areas(broker, config, peer, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Requests (Message API and call()) and replies above a slot and up to 1 MiB go through the
    rings, both ways: the ring counts carry every byte, and no section is ever made."""
    peer("server", f"qb.both.{mode}", "--mode", mode)
    with connect(config, f"qb.both.{mode}") as comm:
        quick = comm._quick
        assert comm.quick and quick is not None
        for _ in range(3):
            # (The first post may find the server in poll() and ring its socket doorbell; the
            # next then waits for the server to read that: the socket.)
            comm.call(b"warm")
        before = quick.ring.counts()
        sizes = (quick.payload_max + 1, 4096, 65536, BULK)
        for size in sizes:
            body = body_of(size)
            reply = comm.request(body, timeout=10)
            assert reply.data == body.upper()
            assert reply.callback_id & alpc.protocol.QUICK_ID_BIT  # a ring request's id
            assert comm.call(body, timeout=10) == body.upper()
            assert comm.call(f"big:{size}".encode(), timeout=10) == b"b" * size
            big = comm.request(f"big:{size}".encode(), timeout=10)  # a large reply as a Message
            assert big.data == b"b" * size and big.sender.pid == comm.peer.pid
        after = quick.ring.counts()
        assert after["messages_out"] - before["messages_out"] == 4 * len(sizes)
        assert after["bytes_out"] - before["bytes_out"] >= 2 * sum(sizes)
        assert after["bytes_in"] - before["bytes_in"] >= 4 * sum(sizes)
        assert sections_made(comm) == []


def test_a_port_that_waits_gets_large_requests_through_the_bulk_area_too(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """A multiplexing server (wait()) drains the ring, bulk entries included."""
    peer("server", "qb.wait", "--mode", "wait")
    with connect(config, "qb.wait") as comm:
        assert comm.quick
        for size in (1000, 65536, BULK):
            body = body_of(size)
            for _ in range(3):
                assert comm.request(body, timeout=10).data == body.upper()
                assert comm.call(f"big:{size}".encode(), timeout=10) == b"b" * size


@pytest.mark.parametrize("mode", ["serve", "receive"])
def test_concurrent_callers_of_every_size_get_their_own_replies(broker, config, peer, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Four threads of one client, bodies from empty to past the bulk area, requests and calls:
    one takes the ring while the others take the socket (the bulk area holds one body), and
    every reply is the caller's own."""
    peer("server", f"qb.many.{mode}", "--mode", mode)
    sizes = [0, 1, 480, 481, 4096, 65536, 300_000, BULK - 1, BULK, BULK + 1]
    with connect(config, f"qb.many.{mode}") as comm:
        failures: list[BaseException] = []

        def caller(seed: int) -> None:
            try:
                for turn in range(12):
                    size = sizes[(seed * 7 + turn * 3) % len(sizes)]
                    body = (b"%d:%d:" % (seed, turn)) + body_of(size)
                    if turn % 2:
                        assert comm.call(body, timeout=30) == body.upper()
                    else:
                        assert comm.request(body, timeout=30).data == body.upper()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        assert failures == []
        quick = comm._quick
        assert quick is not None
        # Alone again, a large call takes the ring: at once, or once the server has read the
        # socket bytes this side sent before (releases of reply sections: a ring post waits for
        # them, and takes the socket meanwhile).
        body = body_of(300_000)
        for _ in range(5):
            before = quick.ring.counts()["bytes_out"]
            assert comm.call(body, timeout=10) == body.upper()
            if quick.ring.counts()["bytes_out"] == before + len(body):
                break
        else:
            pytest.fail("a lone large call never took the ring")


def test_a_body_over_the_bulk_area_takes_a_section(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    peer("server", "qb.over")
    with connect(config, "qb.over") as comm:
        quick = comm._quick
        assert quick is not None
        body = body_of(BULK + 1)
        assert comm.request(body, timeout=10).data == body.upper()
        assert sections_made(comm) != []
        assert quick.ring.counts()["bytes_out"] < BULK  # (the request went by the socket)
        assert len(comm.call(f"big:{BULK + 1}".encode(), timeout=10)) == BULK + 1


def ring_memory() -> int:
    """Bytes of this process's ring mappings in memory now (Rss of memfd:alpc-qlpc)."""
    total, in_ring = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                in_ring = "memfd:alpc-qlpc" in line
            elif in_ring and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def test_trim_sections_gives_the_bulk_areas_pages_back(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """A connection that sent 1 MiB requests keeps that area's pages until trim_sections()."""
    peer("server", "qb.trim")
    with connect(config, "qb.trim") as comm:
        for _ in range(3):
            comm.call(b"warm")
        before = ring_memory()
        # A 1 MiB request with a 10-byte reply (int() takes the padding), so only this side's
        # area fills: the server's, which this side reads replies from, is the server's to trim.
        body = b"big:10" + b" " * (BULK - 6)
        assert comm.call(body, timeout=10) == b"b" * 10
        assert ring_memory() >= before + BULK
        comm.trim_sections(timeout=10)
        assert ring_memory() < before + BULK // 4
        assert comm.call(body, timeout=10) == b"b" * 10  # and it still works


def test_the_rings_keep_each_sides_max_message_length(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A server with a 64 KiB limit: the client's rings carry up to that, and a longer request
    is refused before it is sent, as on the socket (MessageTooLarge)."""
    limit = 65536
    attributes = alpc.PortAttributes(max_message_length=limit, quick_lpc=True)
    with ring_pair(config, "qb.limit", attributes) as (_, server, client):
        assert client._quick is not None and client._quick.carry_max == limit
        served = threading.Thread(target=lambda: server.receive(timeout=10).reply(b"fits"))
        served.start()
        assert client.request(b"x" * limit, timeout=10).data == b"fits"
        served.join(10)
        with pytest.raises(alpc.MessageTooLarge):
            client.request(b"x" * (limit + 1), timeout=10)
        with pytest.raises(alpc.MessageTooLarge):
            client.call(b"x" * (limit + 1), timeout=10)


def test_a_signal_between_the_look_and_the_take_loses_nothing(broker, config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An exception (a signal handler's) after the wait saw a bulk entry and before it was
    copied out leaves the entry in the ring: the next receive() delivers it."""
    with ring_pair(config, "qb.interrupt") as (_, server, client):
        quick = server._quick
        assert quick is not None
        body = body_of(200_000)
        replies: list[bytes] = []
        caller = threading.Thread(target=lambda: replies.append(client.call(body, timeout=10)))
        caller.start()
        real_take = QuickRing.take_bulk
        raised = [0]

        def interrupted(ring: QuickRing) -> int:
            if ring is quick.ring and not raised[0]:
                raised[0] = 1
                raise KeyboardInterrupt  # as a signal handler would, as the wait returns
            return real_take(ring)

        monkeypatch.setattr(QuickRing, "take_bulk", interrupted)
        with pytest.raises(KeyboardInterrupt):
            server.receive(timeout=10)
        assert quick.ring.waiting() == 1  # still there
        message = server.receive(timeout=10)
        assert message.data == body
        message.reply(b"got it")
        caller.join(10)
        assert replies == [b"got it"]


@pytest.mark.parametrize("victim", ["client", "server"])
def test_sigkill_mid_transfer_leaves_nothing(broker, config, peer, victim: str) -> None:  # type: ignore[no-untyped-def]
    """1 MiB requests and replies in a loop while one side is SIGKILLed: the other sees the
    death at once, serves (or connects) again, and nothing is left in /dev/shm."""
    server = peer("server", f"qb.kill.{victim}")
    server_pid = int(server.ready[0])
    if victim == "server":
        with connect(config, f"qb.kill.{victim}") as comm:
            failures: list[BaseException] = []

            def pound() -> None:
                try:
                    while True:
                        comm.call(f"big:{BULK}".encode(), timeout=30)
                        comm.call(body_of(BULK), timeout=30)
                except BaseException as exc:
                    failures.append(exc)

            pounding = threading.Thread(target=pound)
            pounding.start()
            server.expect("ACCEPTED")
            killed = time.monotonic()
            server.kill()
            pounding.join(10)
            assert not pounding.is_alive() and time.monotonic() - killed < PROMPT + 1
            assert isinstance(failures[0], alpc.PeerGone)
        assert shm_names_of(server_pid, os.getpid()) == []
        return
    client = peer("client", f"qb.kill.{victim}")
    assert client.ready[1] == "True"
    client.send(f"pound {BULK}")
    client.expect("POUNDING")  # (after a first round trip: the rest go on until the kill)
    client.kill()
    assert server.expect("CLIENT_DIED")[0] == str(client.pid)
    with connect(config, f"qb.kill.{victim}") as comm:
        assert comm.call(body_of(BULK), timeout=10) == body_of(BULK).upper()
    assert shm_names_of(client.pid, server_pid) == []

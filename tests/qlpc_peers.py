"""Real peer processes for the Quick-LPC tests.

Run as ``python tests/qlpc_peers.py ROLE NAME --runtime-dir DIR ...``. Every role
prints ``READY ...`` once set up and one line per event, so tests synchronise on
lines, never on sleeps.

- ``server``: a port offering Quick-LPC; ``--mode serve`` answers with
  serve_requests() on a thread per client, ``receive`` with receive()/reply(),
  ``wait`` with ConnectionPort.wait() for every client at once. Requests:
  ``noreply`` (none), ``big:N`` (an N-byte reply, too large for a slot),
  ``push:X`` (a datagram X first, then the reply), ``order`` (the events seen so
  far), ``drop`` (become uid/gid 65534, then reply), anything else upper-cased.
  A datagram ``hold`` makes that client's thread print ``HOLDING`` and read nothing
  until a line arrives on stdin.
  ``--hostile-reply KIND`` instead answers the first ring request with a broken
  ring entry.
- ``client``: connects and prints ``QUICK <bool>``; stdin lines ``call X``,
  ``request X`` (prints the reply Message's sender and identity_changed),
  ``drop`` (become uid/gid 65534) and ``hang`` (a call the server never answers)
  drive it.
- ``hostile``: a client that connects properly, makes one honest call, then
  writes a broken entry (``--damage KIND``) into its ring and waits.
"""

from __future__ import annotations

import argparse
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable

import alpc
from alpc import qlpc

_SAY = threading.Lock()
SIDE = {"server": 128, "client": 256}
SIDE_FIELDS = {"seq": 0, "tail": 4, "head": 8, "state": 12, "cpu": 16, "attached": 20, "sock_sends": 24}
ENTRY = struct.Struct("<IIIIIIQ")
REQUEST, REPLY = 1, 2
BULK, BULK_SIZE = 16, 1 << 20
ID_BIT = 0x40000000
NOBODY = 65534


def say(*parts: object) -> None:
    line = " ".join(map(str, parts)) + "\n"
    with _SAY:
        sys.stdout.write(line)
        sys.stdout.flush()


class Region:
    """A second, Python-side mapping of a connection's ring region, for writing what a hostile peer would."""

    def __init__(self, fd: int, slots: int, slot_size: int) -> None:
        self.slots = slots
        self.slot_size = slot_size
        self.mm = mmap.mmap(fd, 512 + 2 * slots * slot_size)
        os.close(fd)
        # The side words, as the C side's uint32_t. Each goes through one whole-word load or
        # store: struct.pack_into zeroes its bytes before writing them, so the peer could see
        # a tail of 0 (behind its head: "claims more entries than the ring holds") instead of
        # the damage the test expects.
        self.words = memoryview(self.mm).cast("I")

    def word(self, side: str, field: str) -> int:
        return int(self.words[(SIDE[side] + SIDE_FIELDS[field]) // 4])

    def set_word(self, side: str, field: str, value: int) -> None:
        self.words[(SIDE[side] + SIDE_FIELDS[field]) // 4] = value & 0xFFFFFFFF

    def slot(self, producer: str, index: int) -> int:
        ring = 512 + (self.slots * self.slot_size if producer == "client" else 0)
        return ring + (index % self.slots) * self.slot_size

    def write_entry(self, producer: str, index: int, kind: int, length: int, message_id: int, callback_id: int,
                    reserved: int = 0) -> None:
        ENTRY.pack_into(self.mm, self.slot(producer, index), kind, length, message_id, callback_id, 0, reserved, 0)


def damage(region: Region, producer: str, kind: str, honest_kind: int) -> None:
    """Publish one broken entry (or a lying index) in ``producer``'s ring."""
    tail = region.word(producer, "tail")
    good_ids = (ID_BIT | 7, 0) if honest_kind == REQUEST else (0, region_last_id(region))
    if kind == "index":
        region.set_word(producer, "tail", tail + 1000)
        return
    if kind == "length":
        region.write_entry(producer, tail, honest_kind, 1 << 20, *good_ids)
    elif kind == "bulk":
        region.write_entry(producer, tail, honest_kind | BULK, BULK_SIZE + 1, *good_ids)
    elif kind == "kind":
        region.write_entry(producer, tail, 3 - honest_kind, 4, *good_ids)
    elif kind == "reserved":
        region.write_entry(producer, tail, honest_kind, 4, *good_ids, reserved=1)
    elif kind == "id":
        region.write_entry(producer, tail, honest_kind, 4, 7 if honest_kind == REQUEST else 0,
                           0 if honest_kind == REQUEST else 7)
    elif kind == "half":
        # What a writer killed mid-entry leaves: the bytes, never the published index.
        region.write_entry(producer, tail, honest_kind, 1 << 20, 0, 0)
        return
    region.set_word(producer, "tail", tail + 1)


def region_last_id(region: Region) -> int:
    """The id of the last request the client put in its ring (what a reply must name)."""
    tail = region.word("client", "tail")
    return int(ENTRY.unpack_from(region.mm, region.slot("client", tail - 1))[2])


def keep_region(grab: list[Region], original: Callable[..., object]) -> Callable[..., object]:
    """Wrap QuickLink.accept / qlpc.offer to keep a Python mapping of the rings they set up."""
    def accept(fd: int, slots: int, slot_size: int, *rest: object) -> object:
        grab.append(Region(os.dup(fd), slots, slot_size))
        return original(fd, slots, slot_size, *rest)
    return accept


# -- server ----------------------------------------------------------------------


def drop_privileges() -> None:
    """The privilege-separation step: no supplementary groups, then nobody's gid and uid."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def answer(data: bytes, comm: alpc.CommunicationPort, seen: list[str]) -> bytes | None:
    seen.append(data.decode(errors="replace"))
    if data == b"drop":
        drop_privileges()
        return b"DROPPED"
    if data == b"noreply":
        say("NOREPLY")
        return None
    if data.startswith(b"big:"):
        return b"b" * int(data[4:])
    if data.startswith(b"push:"):
        comm.send(data[5:])
        return b"pushed"
    if data == b"order":
        return " ".join(seen[:-1]).encode()
    return data.upper()


def serve_client(comm: alpc.CommunicationPort, mode: str) -> None:
    seen: list[str] = []
    say("ACCEPTED", comm.client.pid)
    try:
        if mode == "serve":
            serve_loop(comm, seen)
        else:
            receive_loop(comm, seen)
    except alpc.AlpcError as exc:
        say("ERROR", type(exc).__name__, str(exc).replace(" ", "_"))


def serve_loop(comm: alpc.CommunicationPort, seen: list[str]) -> None:
    class NoReply(Exception):
        pass

    def handler(data: bytes) -> bytes:
        reply = answer(data, comm, seen)
        if reply is None:
            # serve_requests answers a handler that raises at once (empty): to leave the request
            # unanswered, hold it (the tests that send one kill this server meanwhile).
            threading.Event().wait(60)
            raise NoReply
        return reply

    while True:
        try:
            other = comm.serve_requests(handler, timeout=60)
        except NoReply:
            continue
        if other.type is alpc.MessageType.DATAGRAM:
            seen.append("D:" + other.data.decode())
            continue
        report(other)
        return


def receive_loop(comm: alpc.CommunicationPort, seen: list[str]) -> None:
    while True:
        message = comm.receive(timeout=60)
        if not handle(message, comm, seen):
            return


# Views of the client's requests this server keeps unreleased ("keep:" views) until "free".
held: list[alpc.View] = []


def answer_view(message: alpc.Message, comm: alpc.CommunicationPort) -> None:
    """A request sent as a view: read in place, answered with a view of this side's (upper
    case), and told on stdout: its length, whether the reply view lives in the bulk area,
    and how many sections this side has made."""
    view = message.view
    assert view is not None and view.readonly
    if bytes(view.memory[:5]) == b"keep:":
        held.append(view)
        message.reply(b"kept")
        return
    with view as memory:
        upper = bytes(memory).upper()
    reply = comm.create_view(len(upper), timeout=30)
    reply.memory[:] = upper
    in_ring = isinstance(reply, alpc.RingView)
    message.reply(reply)
    say("VIEWED", len(upper), in_ring, len(comm._channel.sections.pool.ledger.section_ids))  # type: ignore[union-attr]


def handle(message: alpc.Message, comm: alpc.CommunicationPort, seen: list[str]) -> bool:
    if message.type is alpc.MessageType.REQUEST and message.view is not None:
        answer_view(message, comm)
        return True
    if message.type is alpc.MessageType.REQUEST and message.data == b"free":
        while held:
            held.pop().release()
        message.reply(b"freed")
        return True
    if message.type is alpc.MessageType.REQUEST:
        reply = answer(message.data, comm, seen)
        if reply is not None:
            message.reply(reply)
        return True
    if message.type is alpc.MessageType.DATAGRAM:
        seen.append("D:" + message.data.decode())
        if message.data == b"hold":
            say("HOLDING")
            sys.stdin.readline()
        return True
    if held:
        # The client is gone: the views it lent stay readable until released here.
        intact = all(bytes(view.memory[:5]) == b"keep:" for view in held)
        say("HELD", len(held), intact)
        while held:
            held.pop().release()
    report(message)
    return False


def report(message: alpc.Message) -> None:
    say(message.type.name, message.sender.pid, message.reason.replace(" ", "_"))


def server(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(quick_lpc=not args.no_quick, quick_slots=args.slots,
                                     quick_slot_size=args.slot_size)
    grabbed: list[Region] = []
    if args.hostile_reply:
        qlpc.offer = keep_offer(grabbed, qlpc.offer)  # type: ignore[assignment]
    with alpc.create_port(args.name, attributes, config=config) as port:
        say("READY", os.getpid(), qlpc.available())
        if args.hostile_reply:
            hostile_server(port, grabbed, args.hostile_reply)
        elif args.mode == "wait":
            wait_loop(port)
        else:
            while True:
                comm = port.listen(timeout=60).accept()
                threading.Thread(target=serve_client, args=(comm, args.mode), daemon=True).start()


def keep_offer(grab: list[Region], original: Callable[..., tuple[qlpc.QuickLink, int]]
               ) -> Callable[..., tuple[qlpc.QuickLink, int]]:
    def offer(slots: int, slot_size: int, *rest: object) -> tuple[qlpc.QuickLink, int]:
        link, fd = original(slots, slot_size, *rest)
        grab.append(Region(os.dup(fd), slots, slot_size))
        return link, fd
    return offer


def wait_loop(port: alpc.ConnectionPort) -> None:
    seen: dict[int, list[str]] = {}
    while True:
        event = port.wait(timeout=60)
        if isinstance(event, alpc.ConnectionRequest):
            comm = event.accept()
            say("ACCEPTED", comm.client.pid)
            continue
        handle(event, event.port, seen.setdefault(id(event.port), []))


def hostile_server(port: alpc.ConnectionPort, grabbed: list[Region], kind: str) -> None:
    comm = port.listen(timeout=60).accept()
    message = comm.receive(timeout=60)
    say("REQUEST", message.data.decode(), comm.quick)
    damage(grabbed[-1], "server", kind, REPLY)
    comm._quick.ring.sent(0)  # type: ignore[union-attr]  # wake the client's waiter
    say("DAMAGED")
    report(comm.receive(timeout=60))


# -- clients ----------------------------------------------------------------------


def client(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    comm = alpc.connect(args.name, timeout=30, config=config)
    say("READY", os.getpid(), comm.quick)
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        try:
            if command == "call":
                say("REPLY", comm.call(rest.encode(), timeout=30).decode())
            elif command == "request":
                reply = comm.request(rest.encode(), timeout=30)
                sender = reply.sender
                say("MESSAGE", reply.data.decode(), sender.pid, sender.uid, sender.gid, reply.identity_changed,
                    bool(reply.callback_id & ID_BIT))
            elif command == "view":
                view = comm.create_view(len(rest), timeout=30)
                view.memory[:] = rest.encode()
                say("VIEW", isinstance(view, alpc.RingView))
                say("VIEWREPLY", comm.request(view, timeout=30).data.decode())
            elif command == "drop":
                drop_privileges()
                say("DROPPED", os.getuid(), os.getgid())
            elif command == "pound":
                body = b"p" * int(rest)
                assert comm.call(body, timeout=30) == body.upper()
                say("POUNDING")
                while True:
                    comm.call(body, timeout=30)
                    comm.call(f"big:{rest}".encode(), timeout=30)
            elif command == "hang":
                say("HANGING")
                comm.call(b"noreply", timeout=60)
        except alpc.AlpcError as exc:
            say("ERROR", type(exc).__name__, str(exc).replace(" ", "_"))


def hostile(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    grabbed: list[Region] = []
    qlpc.QuickLink.accept = keep_region(grabbed, qlpc.QuickLink.accept)  # type: ignore[method-assign,assignment]
    comm = alpc.connect(args.name, timeout=30, config=config)
    say("READY", os.getpid(), comm.quick, comm.call(b"honest", timeout=30).decode())
    damage(grabbed[-1], "client", args.damage, REQUEST)
    if args.damage != "half":
        comm._quick.ring.sent(0)  # type: ignore[union-attr]  # wake the server's waiter
    say("DAMAGED")
    sys.stdin.read()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client", "hostile"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--mode", choices=["serve", "receive", "wait"], default="serve")
    parser.add_argument("--no-quick", action="store_true")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--slot-size", type=int, default=512)
    parser.add_argument("--damage", default="length")
    parser.add_argument("--hostile-reply", default="")
    args = parser.parse_args()
    {"server": server, "client": client, "hostile": hostile}[args.role](args)


if __name__ == "__main__":
    main()

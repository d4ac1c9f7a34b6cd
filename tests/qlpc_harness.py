"""The in-process Quick-LPC ring pair that test_qlpc_ring.py and test_qlpc_faults.py drive:
a server and a client QuickRing over one region, with a Python mapping beside them to
write what a hostile peer would."""

from __future__ import annotations

import mmap
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from alpc import _native
from alpc._native import Q_TIMEOUT, QuickRing, quick_region_size
from alpc.section import Section

__all__ = ["BULK", "BULK_SIZE", "CLIENT_SIDE", "ENTRY", "HEAD", "ID_BIT", "REPLY", "REQUEST", "SEQ", "SERVER_SIDE",
           "STATE", "TAIL", "Pair", "deadline", "make_pair", "native"]

native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))

ID_BIT = 0x40000000
SERVER_SIDE, CLIENT_SIDE = 128, 256
SEQ, TAIL, HEAD, STATE = 0, 4, 8, 12
ENTRY = struct.Struct("<IIIIIIQ")
REQUEST, REPLY = 1, 2
BULK, BULK_SIZE = 16, 1 << 20  # an entry's kind flag: its payload is in its producer's bulk area


@dataclass
class Pair:
    server: QuickRing
    client: QuickRing
    region: mmap.mmap
    slots: int
    slot_size: int
    server_sock: socket.socket
    client_sock: socket.socket
    fd: int  # the region's memfd (still open while the pair is)

    def client_slot(self, index: int) -> int:
        return 512 + self.slots * self.slot_size + (index % self.slots) * self.slot_size

    def server_slot(self, index: int) -> int:
        return 512 + (index % self.slots) * self.slot_size

    def word(self, side: int, field: int) -> int:
        value: int = struct.unpack_from("<I", self.region, side + field)[0]
        return value

    def set_word(self, side: int, field: int, value: int) -> None:
        struct.pack_into("<I", self.region, side + field, value & 0xFFFFFFFF)

    def publish_request(self, kind: int = REQUEST, length: int = 4, message_id: int = ID_BIT | 1,
                        callback_id: int = 0, reserved: int = 0) -> None:
        """Write an entry into the client's ring the way a (possibly lying) client would."""
        tail = self.word(CLIENT_SIDE, TAIL)
        ENTRY.pack_into(self.region, self.client_slot(tail), kind, length, message_id, callback_id, 0, reserved, 0)
        self.set_word(CLIENT_SIDE, TAIL, tail + 1)


@contextmanager
def make_pair(slots: int, slot_size: int, spin_us: int = 0,
              before_client: Callable[[mmap.mmap], None] | None = None) -> Iterator[Pair]:
    """``before_client(region)`` runs once the server laid the region out, before the client maps it."""
    size = quick_region_size(slots, slot_size)
    section = Section.create(size, backend="memfd", shared_writable=True)
    server_sock, client_sock = socket.socketpair()
    server = client = None
    try:
        server = QuickRing(section.fd, size, slots, slot_size, server=True, sock_fd=server_sock.fileno(),
                           pidfd=None, spin_ns=spin_us * 1000)
        region = mmap.mmap(section.fd, size)
        try:
            if before_client is not None:
                before_client(region)
            client = QuickRing(section.fd, size, slots, slot_size, server=False, sock_fd=client_sock.fileno(),
                               pidfd=None, spin_ns=spin_us * 1000)
            # A server starts out waiting in poll() (doorbell wanted); one look in C ends that.
            assert server.reply_wait(0, b"", 0, 0) == Q_TIMEOUT
            yield Pair(server, client, region, slots, slot_size, server_sock, client_sock, section.fd)
        finally:
            region.close()
    finally:
        for ring in (server, client):
            if ring is not None:
                ring.close()
        section.close()
        server_sock.close()
        client_sock.close()


def deadline(seconds: float) -> int:
    return time.monotonic_ns() + int(seconds * 1e9)

"""Shared memory plus semaphores: multiprocessing.shared_memory, and posix_ipc.

One segment holds two rings (client to server, server to client) of
fixed-size slots; per ring, a ``spaces`` semaphore counts free slots and an
``items`` semaphore counts filled ones. A sender copies its message into a
slot, the receiver copies it out into its own bytes: the same one copy each
side that message passing through a kernel costs, without the kernel.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct
from abc import ABC, abstractmethod

from ..core import MIB
from .base import WAIT_TIMEOUT, Buffer, Handler, OneWayClient, Server, ServerMode, Transport, TransportTimeout

__all__ = ["MpSharedMemoryTransport", "PosixIpcTransport"]

_LENGTH = struct.Struct("<Q")
# Deep enough that a one-way burst rarely waits for the reader; shallow enough
# that the segment stays small for large messages.
_MAX_SLOTS = 64
_RING_BYTES = 4 * MIB


class _Ring:
    """A single-producer single-consumer ring of ``slots`` slots in ``buf``."""

    def __init__(self, buf: memoryview, slots: int, slot_size: int, items: _TimedSemaphore,
                 spaces: _TimedSemaphore) -> None:
        self._buf = buf
        self._slots = slots
        self._slot_size = slot_size
        self._items = items
        self._spaces = spaces
        self._head = 0
        self._tail = 0

    def put(self, data: Buffer) -> None:
        length = len(data)
        if length > self._slot_size - _LENGTH.size:
            raise ValueError(f"message of {length} bytes exceeds the slot size {self._slot_size}")
        self._spaces.acquire()
        offset = self._head * self._slot_size
        _LENGTH.pack_into(self._buf, offset, length)
        self._buf[offset + _LENGTH.size:offset + _LENGTH.size + length] = data
        self._head = (self._head + 1) % self._slots
        self._items.release()

    def get(self) -> bytes:
        self._items.acquire()
        offset = self._tail * self._slot_size
        (length,) = _LENGTH.unpack_from(self._buf, offset)
        if length > self._slot_size - _LENGTH.size:
            raise ValueError(f"slot claims {length} bytes, more than it holds")
        data = bytes(self._buf[offset + _LENGTH.size:offset + _LENGTH.size + length])
        self._tail = (self._tail + 1) % self._slots
        self._spaces.release()
        return data

    def release(self) -> None:
        self._buf.release()


class _TimedSemaphore(ABC):
    @abstractmethod
    def acquire(self) -> None:
        """Take one unit, or raise TransportTimeout after WAIT_TIMEOUT."""

    @abstractmethod
    def release(self) -> None: ...


class _ShmClient(OneWayClient):
    def __init__(self, to_server: _Ring, from_server: _Ring) -> None:
        self._out = to_server
        self._in = from_server

    def request(self, data: Buffer) -> Buffer:
        self._out.put(data)
        return self._in.get()

    def send(self, data: Buffer) -> None:
        self._out.put(data)

    def close(self) -> None:
        """Nothing to close: the segment is released by the transport."""


class _ShmServer(Server):
    def __init__(self, from_client: _Ring, to_client: _Ring, handler: Handler) -> None:
        super().__init__(handler)
        self._in = from_client
        self._out = to_client

    def serve(self) -> None:
        while True:
            reply = self.handler(self._in.get())
            if reply is not None:
                self._out.put(reply)


class _SharedMemoryTransport(Transport):
    """The ring layout; subclasses supply the segment and the semaphores."""

    def prepare(self, channels: int, max_message: int) -> None:
        super().prepare(channels, max_message)
        if channels != 1:
            raise ValueError("the shared-memory peers serve exactly one client")
        slot_size = _LENGTH.size + max_message
        slots = max(1, min(_MAX_SLOTS, _RING_BYTES // slot_size))
        ring_bytes = slots * slot_size
        buf = self._map_segment(2 * ring_bytes)
        self._to_server = _Ring(buf[:ring_bytes], slots, slot_size, self._semaphore("c2s-items", 0),
                                self._semaphore("c2s-spaces", slots))
        self._to_client = _Ring(buf[ring_bytes:], slots, slot_size, self._semaphore("s2c-items", 0),
                                self._semaphore("s2c-spaces", slots))

    def _release_views(self) -> None:
        """Drop every export of the mapping; it cannot be closed while one is alive."""
        self._to_server.release()
        self._to_client.release()

    @abstractmethod
    def _map_segment(self, size: int) -> memoryview: ...

    @abstractmethod
    def _semaphore(self, role: str, value: int) -> _TimedSemaphore: ...

    def server(self, mode: ServerMode, handler: Handler) -> Server:
        return _ShmServer(self._to_server, self._to_client, handler)

    def client(self, index: int) -> _ShmClient:
        return _ShmClient(self._to_server, self._to_client)


class _MpSemaphore(_TimedSemaphore):
    def __init__(self, value: int) -> None:
        self._sem = multiprocessing.get_context("fork").Semaphore(value)

    def acquire(self) -> None:
        if not self._sem.acquire(timeout=WAIT_TIMEOUT):
            raise TransportTimeout("semaphore wait timed out")

    def release(self) -> None:
        self._sem.release()


class MpSharedMemoryTransport(_SharedMemoryTransport):
    """``multiprocessing.shared_memory.SharedMemory`` with ``multiprocessing.Semaphore``."""

    def _map_segment(self, size: int) -> memoryview:
        from multiprocessing import shared_memory

        self._shm = shared_memory.SharedMemory(name=f"alpcbench-{self.job.tag}", create=True, size=size)
        # Both processes hold the mapping across the fork, so the name can go now:
        # nothing is left in /dev/shm even if this repetition is killed.
        self._shm.unlink()
        buf = self._shm.buf
        assert buf is not None
        return buf

    def _semaphore(self, role: str, value: int) -> _TimedSemaphore:
        return _MpSemaphore(value)

    def cleanup(self) -> None:
        self._release_views()
        self._shm.close()


class _PosixSemaphore(_TimedSemaphore):
    def __init__(self, name: str, value: int) -> None:
        import posix_ipc

        self._busy = posix_ipc.BusyError
        self._sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, value)
        self._sem.unlink()

    def acquire(self) -> None:
        try:
            self._sem.acquire(WAIT_TIMEOUT)
        except self._busy:
            raise TransportTimeout("semaphore wait timed out") from None

    def release(self) -> None:
        self._sem.release()

    def close(self) -> None:
        self._sem.close()


class PosixIpcTransport(_SharedMemoryTransport):
    """``posix_ipc.SharedMemory`` mapped with mmap, with ``posix_ipc.Semaphore``."""

    def _map_segment(self, size: int) -> memoryview:
        import posix_ipc

        segment = posix_ipc.SharedMemory(f"/alpcbench-{self.job.tag}", posix_ipc.O_CREX, 0o600, size)
        try:
            self._map = mmap.mmap(segment.fd, size)
        finally:
            segment.close_fd()
            segment.unlink()
        self._sems: list[_PosixSemaphore] = []
        self._view = memoryview(self._map)
        return self._view

    def _semaphore(self, role: str, value: int) -> _TimedSemaphore:
        semaphore = _PosixSemaphore(f"/alpcbench-{self.job.tag}-{role}", value)
        self._sems.append(semaphore)
        return semaphore

    def cleanup(self) -> None:
        self._release_views()
        self._view.release()
        for semaphore in self._sems:
            semaphore.close()
        self._map.close()

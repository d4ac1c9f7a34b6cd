"""Direct client memory (ALPC's third data path): a client grants the server a buffer.

For one request, a client may grant the server read and/or write access to
one of its buffers (``MemoryGrant``). The server's runtime then reads or
writes it straight in the client's address space with process_vm_readv /
process_vm_writev, every range checked against the grant first
(``PeerMemory``). Where the kernel refuses (EPERM: another uid, ptrace
policy, containers) or the port turns direct access off, the same calls go
through the connection instead: the client's runtime ships the requested
range, or applies the server's writes, over the section path.

The grant is a cooperative contract, not a sandbox: a server the kernel
lets use process_vm_writev on the client could write anywhere in it. What
the grant guarantees is that alpc itself never touches memory outside it.
"""

from __future__ import annotations

import errno
from typing import Any

from . import _native
from .errors import ConnectionClosed, PeerGone, SectionError
from .wire import Access, GrantAttr, Range

__all__ = [
    "LocalGrant",
    "MemoryGrant",
    "PeerMemory",
    "direct_read",
    "direct_write",
]


class MemoryGrant:
    """A buffer a client lends the server for one request.

    ``read`` lets the server read it; ``write`` lets the server write into it
    (the buffer must then be writable, e.g. a bytearray or a writable
    memoryview). Until the reply arrives (or the connection closes) the
    server may write into it: do not reuse the buffer before then. A request
    given up on (cancelled, timed out, dropped) keeps the buffer pinned (a
    bytearray cannot be resized, an mmap not closed) until the server has
    answered it, so its late write never lands in memory put to other use.
    """

    def __init__(self, buffer: Any, *, read: bool = True, write: bool = False) -> None:
        if not read and not write:
            raise ValueError("a grant needs read or write access")
        self.memory = memoryview(buffer).cast("B")
        if write and self.memory.readonly:
            raise SectionError("a write grant needs a writable buffer")
        if not self.memory.nbytes:
            raise SectionError("cannot grant an empty buffer")
        self.buffer = buffer
        self.access = (Access.READ if read else Access.NONE) | (Access.WRITE if write else Access.NONE)

    def pin(self) -> LocalGrant:
        return LocalGrant(self)


class LocalGrant:
    """The client's side of a grant while its request is in flight."""

    def __init__(self, grant: MemoryGrant) -> None:
        self.memory = grant.memory
        self.access = grant.access
        self.length = grant.memory.nbytes
        self._pinned: _native.Pinned | None = _native.buffer_address(grant.buffer, bool(grant.access & Access.WRITE))

    @property
    def attr(self) -> GrantAttr:
        assert self._pinned is not None
        return GrantAttr(self._pinned.address, self.length, int(self.access))

    def allows(self, span: Range, access: Access) -> bool:
        return bool(self.access & access) and _native.check_range(span.offset, span.length, self.length, self.length)

    def release(self) -> None:
        pinned, self._pinned = self._pinned, None
        if pinned is not None:
            pinned.release()


def _vm_error(result: int, what: str) -> SectionError | None:
    """None for EPERM (the caller falls back), an error for anything else."""
    if result == -errno.EPERM:
        return None
    if result == _native.E_RANGE:
        return SectionError(f"{what} outside the grant")
    if result == -errno.ESRCH:
        raise PeerGone("the client process is gone")
    return SectionError(f"{what} failed: {errno.errorcode.get(-result, result)}")


def direct_read(pid: int, grant: GrantAttr, offset: int, into: memoryview) -> bool:
    """Fill ``into`` from the grant; False when the kernel refuses (EPERM)."""
    result = _native.vm_read(pid, grant.address, grant.length, offset, into)
    if result >= 0:
        return True
    error = _vm_error(result, "reading the client's memory")
    if error is not None:
        raise error
    return False


def direct_write(pid: int, grant: GrantAttr, offset: int, data: Any) -> bool:
    """Write ``data`` into the grant; False when the kernel refuses (EPERM)."""
    result = _native.vm_write(pid, grant.address, grant.length, offset, data)
    if result >= 0:
        return True
    error = _vm_error(result, "writing the client's memory")
    if error is not None:
        raise error
    return False


class PeerMemory:
    """The server's handle on a buffer the client granted with its request.

    ``read``/``readinto``/``write`` take offsets inside the grant and check
    them against it; they are valid until the request is replied to.
    ``direct`` tells whether the last call went straight to the client's
    memory (True) or through the connection (False).
    """

    def __init__(self, message: Any, grant: GrantAttr) -> None:
        self._message = message
        self.request_id: int = message.id
        # The process that sent the request (SCM_CREDENTIALS): the grant's address is in its memory.
        self.sender_pid: int = message.sender.pid
        self.length = grant.length
        self.readable = bool(grant.access & Access.READ)
        self.writable = bool(grant.access & Access.WRITE)
        self.attr = grant
        self.direct: bool | None = None

    def _driver(self) -> Any:
        port = self._message.port
        if port is None:
            raise ConnectionClosed("the request is not attached to a port")
        if not hasattr(port, "_grant_read"):
            raise SectionError("memory grants are served by the blocking API only (not alpc.aio)")
        return port

    def _check(self, offset: int, length: int, allowed: bool, what: str) -> None:
        if not allowed:
            raise SectionError(f"the grant does not allow {what}")
        if not _native.check_range(offset, length, self.length, self.length):
            raise SectionError(f"[{offset}, +{length}) is outside the {self.length}-byte grant")

    def read(self, offset: int = 0, length: int | None = None, timeout: float | None = None) -> bytes:
        """A copy of [offset, offset + length) of the granted buffer."""
        length = self.length - offset if length is None else length
        self._check(offset, length, self.readable, "reading")  # (before allocating what it names)
        into = bytearray(length)
        self.readinto(into, offset, timeout)
        return bytes(into)

    def readinto(self, buffer: Any, offset: int = 0, timeout: float | None = None) -> int:
        """Fill ``buffer`` from the grant, starting ``offset`` bytes in; returns its length."""
        into = memoryview(buffer).cast("B")
        self._check(offset, into.nbytes, self.readable, "reading")
        self._driver()._grant_read(self, offset, into, timeout)
        return into.nbytes

    def write(self, data: Any, offset: int = 0, timeout: float | None = None) -> None:
        """Write ``data`` into the grant, starting ``offset`` bytes in."""
        payload = memoryview(data).cast("B")
        self._check(offset, payload.nbytes, self.writable, "writing")
        self._driver()._grant_write(self, offset, payload, timeout)

    def __repr__(self) -> str:
        access = ("r" if self.readable else "") + ("w" if self.writable else "")
        return f"<PeerMemory {self.length} bytes {access} for request {self.request_id}>"

"""Shared-memory sections: sealed memfds and POSIX shared memory, views, and pools.

One ``Section`` type serves both backends:

- **memfd** (Linux, the default): sealed against shrinking and growing at
  creation and passed by SCM_RIGHTS, so a receiver that checked the seals can
  map it without any risk of SIGBUS; never named, so nothing can leak in
  /dev/shm. A secure section is also write-sealed after its writer unmapped it,
  so the receiver's view is immutable.
- **posix** (posix_ipc): a named object in /dev/shm, created O_CREX with mode
  0600 and a random name carrying ``$ALPC_SHM_PREFIX`` (default ``alpc-``) and
  the creator's pid. It serves named sections a third process opens by name,
  and systems without memfd. It cannot be sealed, so only a trusting receiver
  maps one from a peer.

Mappings are reference-counted: the section and every view hold one
reference, and the memory is unmapped when the last is released, so a view
still exported when its connection closes stays valid.

``SectionPool`` (the sender's sections of one connection) and ``PeerSections``
(the sections the peer lent us) put memory behind the sans-IO ``ledger``; both
are driven under the connection's lock by ``protocol.Channel``.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable
from typing import Any

import posix_ipc

from . import _native
from .config import default_section_backend
from .errors import ConnectionClosed, ProtocolError, QuotaExceeded, SectionError
from .ledger import Grow, InboundLedger, OutboundLedger, Slot
from .transport import process_id
from .wire import Release, SectionFlag, SectionNew, SectionRef

__all__ = [
    "F_SEAL_FUTURE_WRITE",
    "ConnectionSections",
    "PeerSections",
    "RingView",
    "Section",
    "SectionPool",
    "SectionView",
    "View",
    "check_peer_fd",
    "check_size",
    "map_placed",
    "ring_memfd",
    "shm_prefix",
    "sweep_stale_names",
]

# Python 3.11 lacks this constant (Linux 5.1+): no new writable mappings or
# write() calls, while mappings that already exist stay writable.
F_SEAL_FUTURE_WRITE = 0x10
_SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_SECURE = int(SectionFlag.SECURE)
_SHM_DIR = "/dev/shm"
_PREFIX_OK = re.compile(r"[A-Za-z0-9._-]{1,64}")


def shm_prefix() -> str:
    """The prefix of every POSIX shm name alpc creates (``$ALPC_SHM_PREFIX``, default ``alpc-``)."""
    prefix = os.environ.get("ALPC_SHM_PREFIX", "alpc-")
    if not _PREFIX_OK.fullmatch(prefix):
        raise SectionError(f"ALPC_SHM_PREFIX {prefix!r} may use only letters, digits and . _ - (1-64)")
    return prefix


def _new_name() -> str:
    return f"/{shm_prefix()}{os.getpid()}-{secrets.token_hex(8)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not _exiting(pid)


# A task's flags (the ninth field of /proc/.../stat): it is in do_exit and runs no user code again.
_PF_EXITING = 0x4


def _exiting(pid: int) -> bool:
    """True if every thread of ``pid`` is past its last instruction, though kill() still finds it.

    A zombie (a dead child its parent has not reaped yet) is one; so is a
    process killed a moment ago whose fds the kernel closed (its peer sees EOF)
    before it reported the exit (its pidfd becomes readable a little later).
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False  # no /proc here: trust kill()
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat_file:
                line = stat_file.read()
        except OSError:
            continue  # this thread is gone already
        # The fields after the command name, which is in parentheses and may hold any byte.
        rest = line[line.rfind(b")") + 2:].split()
        if len(rest) < 7 or (rest[0] not in (b"Z", b"X") and not int(rest[6]) & _PF_EXITING):
            return False
    return True


def sweep_stale_names(pid: int | None = None) -> list[str]:
    """Unlink POSIX shm names with this process's prefix whose creator is dead.

    A creator unlinks its names as soon as every party holds an fd, but a
    SIGKILL between creating and unlinking would leave one behind; the names
    carry the creator's pid so a survivor can clean up. ``pid`` limits the
    sweep to that creator. Returns the names removed.
    """
    try:
        entries = os.listdir(_SHM_DIR)
    except OSError:
        return []
    prefix = shm_prefix()
    removed = []
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        owner, _, rest = entry[len(prefix):].partition("-")
        if not owner.isdigit() or not rest or (pid is not None and int(owner) != pid) or _alive(int(owner)):
            continue
        try:
            posix_ipc.unlink_shared_memory("/" + entry)
            removed.append(entry)
        except (posix_ipc.ExistentialError, PermissionError, OSError):
            pass
    return removed


class _Mapping:
    """One mmap shared by its section and every view into it; unmapped by the last user."""

    def __init__(self, mm: mmap.mmap, size: int, writable: bool) -> None:
        self._mm = mm
        # (Read-only here too when the pages are: see map_placed, whose mmap object thinks not.)
        self._base = memoryview(mm) if writable else memoryview(mm).toreadonly()
        self.size = size
        self.writable = writable
        self._users = 1  # the section itself
        # Reentrant: a view's finalizer may run inside another call on this mapping.
        self._lock = threading.RLock()

    @property
    def users(self) -> int:
        return self._users

    def acquire(self, offset: int, length: int) -> memoryview:
        with self._lock:
            if self._users <= 0:
                raise SectionError("the section is unmapped")
            self._users += 1
            return self._base[offset:offset + length]

    def window(self, offset: int, length: int) -> memoryview:
        """A memoryview of [offset, offset + length) for one use (release it, ``with``)."""
        return self._base[offset:offset + length]

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            if self._users <= 0:
                raise SectionError("the section is unmapped")
            return _native.copy_out(self._base[offset:offset + length])

    def drop(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users != 0:
                return
        self._base.release()
        try:
            self._mm.close()
        except BufferError:
            # A memoryview derived from a view is still alive: Python refuses to
            # unmap under it, and the mapping goes when that memoryview does.
            pass


def _release_memory(memory: memoryview) -> None:
    try:
        memory.release()
    except BufferError:
        pass  # something holds a buffer export of it; the mapping outlives it


class View:
    """A range of a mapped section: ``memory`` is a memoryview into it, no copy.

    A context manager (entering gives the memoryview, leaving releases it).
    Releasing is what frees the range: for a received view, the sender may
    reuse the space afterwards, so never keep ``memory`` beyond it.
    """

    __slots__ = ("_dropped", "_mapping", "_on_gone", "_wake", "length", "memory", "offset", "secure")

    def __init__(self, mapping: _Mapping, offset: int, length: int,
                 on_gone: Callable[[], None] | None = None, wake: Callable[[], None] | None = None,
                 secure: bool = False, dropped: Callable[[], None] | None = None) -> None:
        self.offset = offset
        self.length = length
        # True when the section is write-sealed: nobody can change these bytes.
        self.secure = secure
        self._on_gone = on_gone
        self._wake = wake
        # Called when the view is collected unreleased (its finalizer: any thread, any moment).
        self._dropped = dropped
        self._mapping: _Mapping | None = None
        self.memory = mapping.acquire(offset, length)
        self._mapping = mapping

    @property
    def released(self) -> bool:
        return self._mapping is None

    @property
    def readonly(self) -> bool:
        return self.memory.readonly

    def _gone(self) -> bool:
        """Drop our mapping reference and give the range back, exactly once."""
        with _RELEASE_LOCK:
            mapping, self._mapping = self._mapping, None
            # Decided with the swap: a sender claims the view under the same lock (see claim).
            unsent = mapping is not None and self._unsent()
        if mapping is None:
            return False
        _release_memory(self.memory)
        mapping.drop()
        self._finished(unsent)
        return True

    def _unsent(self) -> bool:
        return False

    def _finished(self, unsent: bool) -> None:
        if self._on_gone is not None:
            self._on_gone()

    def release(self, *, notify: bool = True) -> None:
        """Unmap this view (once the last view of its section goes) and give its range back.

        ``notify`` (the default) also tells the peer at once; the runtime
        passes False where it batches releases itself.
        """
        if self._gone() and notify and self._wake is not None:
            self._wake()

    def __del__(self) -> None:
        # A view the application dropped without releasing still gives its
        # range back; ``dropped`` may only schedule telling the peer (no I/O here).
        if self._mapping is not None and self._gone() and self._dropped is not None:
            self._dropped()

    def tobytes(self) -> bytes:
        """A copy of the view's bytes (the one call for those who want bytes)."""
        if self.released:
            raise SectionError("the view was released")
        try:
            return _native.copy_out(self.memory)
        except ValueError:
            # Released by another thread between the check and the copy (CPython refuses a
            # released memoryview). Releasing a view while another thread reads it is the
            # application's race: with the GIL let go in the C copy, the range may even go back
            # to the sender mid-copy, so a reader must not release what another still reads.
            raise SectionError("the view was released") from None

    def __len__(self) -> int:
        return self.length

    def __enter__(self) -> memoryview:
        if self.released:
            raise SectionError("the view was released")
        return self.memory

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else ("read-only" if self.readonly else "writable")
        return f"<{type(self).__name__} offset={self.offset} length={self.length} {state}>"


# Release may race between threads (or a thread and __del__); the swap is tiny.
_RELEASE_LOCK = threading.Lock()


def check_peer_fd(fd: int, size: int, *, allow_unsealed: bool = False, writable: bool = False) -> int:
    """Check a peer's shared-memory fd before mapping it; returns its seals.

    Refuses (ProtocolError) anything that is not a shared-memory file of
    exactly ``size`` bytes sealed against shrinking and growing (unless
    ``allow_unsealed``), so no truncation can SIGBUS us; with ``writable``, also
    one whose seals forbid the writable mapping we are about to make.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    # The size only after the seals: a size read before them may change before they are set.
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ProtocolError("a section fd is not a shared-memory file")
    if seals & _SIZE_SEALS != _SIZE_SEALS and not allow_unsealed:
        raise ProtocolError("a section is not sealed against shrinking and growing "
                            "(a peer could truncate it under us)")
    if writable and seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        raise ProtocolError("a shared writable section is sealed against writing")
    if info.st_size != size:
        raise ProtocolError(f"a section is {info.st_size} bytes, announced as {size}")
    return seals


def check_size(what: str, size: object) -> None:
    """SectionError unless ``size`` is a positive int (a float failed deep inside, untyped)."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise SectionError(f"{what} needs a positive size in bytes (an int), not {size!r}")


def _check_section_name(name: object) -> None:
    """A POSIX shared-memory name: one segment of 1..255 bytes, with an optional leading "/".

    Checked here because posix_ipc crashes the process (SIGSEGV) on a name holding a NUL,
    and answers a malformed one with an untyped "Invalid parameter(s)".
    """
    if not isinstance(name, str):
        raise SectionError(f"a section name must be a str, not {type(name).__name__}")
    bare = name[1:] if name.startswith("/") else name
    try:
        size = len(os.fsencode(bare))
    except UnicodeEncodeError:
        raise SectionError(f"section name {name!r} cannot be encoded as a file name") from None
    if not 1 <= size <= 255 or "/" in bare or "\0" in bare:
        raise SectionError(f"section name {name!r} must be 1..255 bytes without NUL or '/' after a leading '/'")
    if bare in (".", ".."):  # /dev/shm itself or its parent: a directory, never a section
        raise SectionError(f"section name {name!r} names a directory, not a section")


def _open_named(name: str, writable: bool) -> int:
    """An fd of the named POSIX shared-memory object, opened without ever blocking.

    shm_open() is a plain open() in /dev/shm, where anyone may make a FIFO under any free
    name: opening that waits for a writer, forever. O_NONBLOCK opens it at once (its type
    is refused next); on a shared-memory file it changes nothing.
    """
    if not os.path.isdir(_SHM_DIR):  # shared memory lives elsewhere here: posix_ipc knows where
        try:
            shm = posix_ipc.SharedMemory(name, read_only=not writable)
        except posix_ipc.ExistentialError:
            raise SectionError(f"no section named {name!r}") from None
        except ValueError:  # posix_ipc's word for EISDIR: a directory opened for writing
            raise SectionError(f"{name!r} is not a section") from None
        try:
            return os.dup(shm.fd)
        finally:
            shm.close_fd()
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(os.path.join(_SHM_DIR, name.lstrip("/")), flags)
    except FileNotFoundError:
        raise SectionError(f"no section named {name!r}") from None
    except IsADirectoryError:
        raise SectionError(f"{name!r} is not a section") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink (shm_open follows none), a socket
            raise SectionError(f"{name!r} is not a section") from None
        raise


def _read_only_fd(name: str) -> int:
    """A read-only fd of the POSIX shared-memory object ``name``."""
    shm = posix_ipc.SharedMemory(name, read_only=True)
    try:
        return os.dup(shm.fd)
    finally:
        shm.close_fd()


def _made(size: int, make: Callable[[], Section]) -> Section:
    """``make()``, or QuotaExceeded (the README's error when no section could be created): a
    size the system cannot back failed with ENOMEM, OverflowError past 2**63 or posix_ipc's
    ValueError for EFBIG."""
    try:
        return make()
    except (OSError, OverflowError, ValueError, posix_ipc.Error) as exc:
        raise QuotaExceeded(f"cannot create a {size}-byte section: {exc}") from None


def ring_memfd(size: int) -> int:
    """A memfd for Quick-LPC's rings: sealed against shrinking and growing (no SIGBUS), not
    against writes (both sides write their own half). The C side maps the rings
    MADV_DONTFORK (a forked child must not post as this process); views map only the
    bulk areas again (``map_placed``), which hold bodies and no indices, as sections hold them.
    Named "alpc-qlpc", so /proc/PID/maps tells it from sections. QuotaExceeded if the
    system cannot back it."""
    check_size("a ring region", size)
    try:
        fd = os.memfd_create("alpc-qlpc", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise QuotaExceeded(f"cannot create a {size}-byte ring region: {exc}") from None
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SIZE_SEALS)
    except OSError as exc:
        os.close(fd)
        raise QuotaExceeded(f"cannot create a {size}-byte ring region: {exc}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_placed(length: int, writable: bool, place: Callable[[int], None]) -> _Mapping:
    """A mapping of ``length`` bytes whose pages ``place(address)`` replaces with shared ones
    (a page-aligned anonymous mapping made here, at ``address``), shared by views and
    unmapped by the last of them, as a section's. It keeps no fd, where a Python mmap of a
    file keeps a duplicate (3.11 has no ``trackfd``). ``place`` raises if it cannot.

    Not ``writable``, the mapping is read-only to Python too: its pages will be read-only
    (the peer's), and a write through the mmap object (a view's ``memory.obj``) must raise
    TypeError, not kill the process with SIGSEGV."""
    mm = mmap.mmap(-1, length) if writable else mmap.mmap(-1, length, access=mmap.ACCESS_READ)
    try:
        pinned = _native.buffer_address(mm, writable)
        address = pinned.address
        pinned.release()
        place(address)
    except BaseException:
        mm.close()
        raise
    return _Mapping(mm, length, writable)


class Section:
    """A shared-memory object and this process's mapping of it.

    Create one with ``Section.create``; open a named one with ``Section.open``.
    ``view(offset, length)`` gives a ``View`` (writable if the mapping is).
    """

    def __init__(self, *, fd: int | None, size: int, backend: str, mapping: _Mapping | None,
                 name: str | None = None, secure: bool = False) -> None:
        self._fd = fd
        self.size = size
        self.backend = backend
        self._mapping = mapping
        self.name = name
        self.secure = secure

    # -- creating, adopting, opening --------------------------------------------------

    @classmethod
    def create(cls, size: int, *, backend: str | None = None, named: bool = False, secure: bool = False,
               shared_writable: bool = False) -> Section:
        """A new section of ``size`` bytes, mapped read-write.

        ``named`` (posix only) keeps its name so another process can ``open`` it;
        the creator must ``unlink`` it once every party holds it. ``secure``
        (memfd only) prepares it to be write-sealed by ``seal``. ``shared_writable``
        (memfd only) leaves out F_SEAL_FUTURE_WRITE, so the peer may map it
        writable too (Quick-LPC's rings, where each side writes its own half).
        """
        backend = backend or default_section_backend()
        check_size("a section", size)
        if backend == "memfd":
            if named:
                raise SectionError("a memfd section has no name; named sections use backend='posix'")
            return _made(size, lambda: cls._create_memfd(size, secure, shared_writable))
        if shared_writable:
            raise SectionError("a shared writable section needs the sealed memfd backend")
        if backend == "posix":
            if secure:
                raise SectionError("secure sections need the sealed memfd backend")
            return _made(size, lambda: cls._create_posix(size, named))
        raise SectionError(f"unknown section backend {backend!r}")

    @classmethod
    def _create_memfd(cls, size: int, secure: bool, shared_writable: bool = False) -> Section:
        fd = os.memfd_create("alpc-section", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SIZE_SEALS)
            mm = mmap.mmap(fd, size)
            if not secure and not shared_writable:
                # Our mapping stays writable; the peer's copy of the fd cannot
                # write or map writable, so only the owner writes its sections.
                try:
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
                except OSError:
                    pass  # kernels before 5.1
        except BaseException:
            os.close(fd)
            raise
        return cls(fd=fd, size=size, backend="memfd", mapping=_Mapping(mm, size, True), secure=secure)

    @classmethod
    def _create_posix(cls, size: int, named: bool) -> Section:
        sweep_stale_names()
        name = _new_name()
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        fds: list[int] = []
        try:
            fds.append(os.dup(shm.fd))
            if not named:
                # The fd the peer gets by SCM_RIGHTS: read-only, as its mapping. Unsealable, our
                # own read-write fd would let it (or whoever it passes it to) truncate the
                # section, and this process die of SIGBUS writing the next message into it.
                fds.append(_read_only_fd(name))
        except BaseException:
            named = False  # nobody will ever open it: the finally below unlinks it
            for fd in fds:
                os.close(fd)
            raise
        finally:
            shm.close_fd()
            if not named:
                # We hold the fds; the peer gets one by SCM_RIGHTS. Nothing needs the name.
                posix_ipc.unlink_shared_memory(name)
        try:
            mm = mmap.mmap(fds[0], size)
        except BaseException:
            for fd in fds:
                os.close(fd)
            if named:
                posix_ipc.unlink_shared_memory(name)
            raise
        if not named:
            os.close(fds.pop(0))  # our mapping is all we write through
        return cls(fd=fds[0], size=size, backend="posix", mapping=_Mapping(mm, size, True),
                   name=name if named else None)

    @classmethod
    def open(cls, name: str, *, writable: bool = False) -> Section:
        """Open a named (posix) section another process created.

        It cannot be sealed: open only sections of a creator you trust not to
        truncate them.
        """
        _check_section_name(name)
        fd = _open_named(name, writable)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # a directory opened read-only: mmap says ENODEV
                raise SectionError(f"{name!r} is not a section")
            size = info.st_size
            if size <= 0:
                raise SectionError(f"section {name!r} is empty")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, prot=prot)
        finally:
            os.close(fd)
        return cls(fd=None, size=size, backend="posix", mapping=_Mapping(mm, size, writable), name=name)

    @classmethod
    def adopt(cls, fd: int, size: int, *, secure: bool, allow_unsealed: bool) -> Section:
        """Map a peer's section read-only after checking it cannot hurt us.

        Takes ownership of ``fd``. Refuses (ProtocolError) anything that is not a
        shared-memory file of exactly ``size`` bytes sealed against shrinking and
        growing (unless ``allow_unsealed``), and a ``secure`` one not write-sealed:
        with the seals checked first, no truncation can SIGBUS us and no write can
        change a secure view after we looked.
        """
        try:
            seals = check_peer_fd(fd, size, allow_unsealed=allow_unsealed)
            if secure and not seals & fcntl.F_SEAL_WRITE:
                raise ProtocolError("a secure section is not write-sealed")
            if secure and seals & _SIZE_SEALS != _SIZE_SEALS:
                # Even where unsealed sections are allowed: F_SEAL_WRITE does not stop ftruncate,
                # and a secure view's bytes must never change (nor vanish: SIGBUS).
                raise ProtocolError("a secure section is not sealed against shrinking and growing")
            try:
                mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            except ValueError as exc:  # CPython's own size check: the file shrank meanwhile
                raise ProtocolError(f"cannot map the section: {exc}") from None
        finally:
            os.close(fd)
        return cls(fd=None, size=size, backend="memfd" if seals & _SIZE_SEALS else "posix",
                   mapping=_Mapping(mm, size, False), secure=secure)

    # -- using ----------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise SectionError("this section has no fd of its own")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._mapping is None and self._fd is None

    @property
    def writable(self) -> bool:
        return self._mapping is not None and self._mapping.writable

    def view(self, offset: int = 0, length: int | None = None, *,
             on_gone: Callable[[], None] | None = None, wake: Callable[[], None] | None = None,
             dropped: Callable[[], None] | None = None) -> View:
        """A view of [offset, offset + length) (to the end by default)."""
        for value in (offset, length):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise SectionError(f"a view's offset and length are ints, not {value!r}")
        if length is None:
            length = self.size - offset
        if not _native.check_range(offset, length, self.size, self.size):
            raise SectionError(f"range [{offset}, +{length}) is outside the {self.size}-byte section")
        if self._mapping is None:
            raise SectionError("the section is not mapped here")
        return View(self._mapping, offset, length, on_gone, wake, self.secure, dropped)

    def fill(self, offset: int, length: int, fill: Callable[[memoryview], None]) -> None:
        """``fill`` the writable range [offset, offset + length), which the caller placed."""
        mapping = self._mapping
        if mapping is None or not mapping.writable:
            raise SectionError("the section is not mapped writable here")
        with mapping.window(offset, length) as target:
            fill(target)

    def read(self, offset: int, length: int) -> bytes:
        """A copy of [offset, offset + length), which the caller checked lies in the section."""
        mapping = self._mapping
        if mapping is None:
            raise SectionError("the section is not mapped here")
        return mapping.read(offset, length)

    def seal(self) -> None:
        """Make the section immutable: unmap our copy and add F_SEAL_WRITE.

        Every view must be released first; the kernel itself refuses the seal
        while any writable mapping exists, so no writer can remain.
        """
        if not self.secure or self._fd is None:
            raise SectionError("only a secure section this process created can be sealed")
        mapping = self._mapping
        if mapping is not None:
            if mapping.users > 1:
                raise SectionError("release every view of a secure section before sending it")
            self._mapping = None
            mapping.drop()
        try:
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        except OSError as exc:
            raise SectionError(f"cannot write-seal the section (a memoryview of it is still alive?): {exc}") from None

    def unlink(self) -> None:
        """Remove the name of a named section (every party already holds it)."""
        if self.name is not None:
            try:
                posix_ipc.unlink_shared_memory(self.name)
            except posix_ipc.ExistentialError:
                pass
            self.name = None

    def close(self) -> None:
        """Drop this section's own mapping and fd; views keep the memory until released."""
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            mapping.drop()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Section:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        name = f" {self.name}" if self.name else ""
        return f"<Section {self.backend}{name} {self.size} bytes{' secure' if self.secure else ''}>"


# -- the sender's side of one connection ---------------------------------------------------


class SectionView(View):
    """Writable space in a connection's section (NtAlpcCreateSectionView).

    Fill ``memory`` in place, then pass the view to ``send``/``request``/``reply``:
    it goes to the peer with no copy, and ``memory`` is released on sending.
    Releasing it unsent gives the space back.
    """

    __slots__ = ("_pool", "announced", "retired", "section_id", "sent", "slot")

    def __init__(self, pool: SectionPool, section: Section, slot: Slot) -> None:
        self._pool = pool
        self.slot = slot
        self.section_id = slot.section_id
        self.sent = False
        self.announced = False
        self.retired: list[int] = []  # SECTION_CLOSE ids riding with this view's frames
        mapping = section._mapping
        assert mapping is not None
        super().__init__(mapping, slot.offset, slot.length, secure=slot.secure)

    def belongs_to(self, pool: SectionPool) -> bool:
        return self._pool is pool

    def check_secure(self, secure: bool) -> None:
        """Refuse sending this view with ``secure=True`` unless it is one: it is already
        placed in a pooled section the sender keeps writable, and the caller asked for a
        message nothing can change (silently sending it plain would break that)."""
        if secure and not self.secure:
            raise SectionError("secure=True needs a secure view: create_view(size, secure=True)")

    def claim(self) -> None:
        """Take the view over for sending; SectionError if it was sent or released already.

        Under the lock of ``_gone``: a release on another thread either comes first (the
        send is refused) or finds the view sent (it gives nothing back). Checked apart, both
        could happen, and the range, sent, was also queued as given back: once the peer
        released it and another view took it, that stale give-back freed the range under
        the new view, and the next one overlapped it.
        """
        with _RELEASE_LOCK:
            if self.sent or self._mapping is None:
                raise SectionError("this view was already sent or released")
            self.sent = True

    def _unsent(self) -> bool:
        return not self.sent

    def _finished(self, unsent: bool) -> None:
        # Released (or dropped) before being sent: the space is ours again.
        if unsent:
            self._pool.give_back(self.slot)


class RingView(SectionView):
    """A view in this side's Quick-LPC bulk area (``create_view`` on a connection with rings).

    Filled in place like any SectionView; a request or a reply through the ring
    publishes it where it is, and the peer maps the same pages read-only: no
    section, no frame on the socket. Sent any other way (a datagram, a ring that
    cannot take it now) its bytes are copied into a section and go as a view
    from there; on another connection it is refused, as a section's view is.
    The area is lent to one view at a time and
    comes back when the view is posted (the peer then holds it until it releases
    its view), released unsent, or copied out.
    """

    __slots__ = ("_unlend", "busy", "loan", "offered", "owner")

    def __init__(self, mapping: _Mapping, size: int, owner: object, loan: int,
                 unlend: Callable[[int], None]) -> None:
        # (Not SectionView.__init__: no pool, no slot; the checks of sending read the rest.)
        self.owner = owner  # the QuickLink that lent the area: sent on another, it is copied
        self.loan = loan  # the C side's number for this loan of the area
        self._unlend = unlend
        self.offered = False  # a ring post was tried (and, if it is copied now, refused for the moment)
        # A send is at work on it (a ring post, a copy into a section): that send, not a release
        # meanwhile, ends the loan. Cleared first thing once it is over, before any call a
        # signal handler could cut short.
        self.busy = False
        self.section_id = 0
        self.sent = False
        self.announced = False
        self.retired = []
        View.__init__(self, mapping, 0, size)

    def belongs_to(self, pool: SectionPool) -> bool:
        return False  # no pool's: a section message copies it (see CommunicationPort._send_section)

    def unclaim(self) -> None:
        """The ring did not take it after all: it may be sent (or released) again. Released by
        another thread meanwhile (which left the loan to the send), the loan ends here."""
        with _RELEASE_LOCK:
            self.sent = False
            released = self._mapping is None
        if released:
            self._unlend(self.loan)

    def posted(self) -> None:
        """The ring published it: the peer reads the area now, and gives it back itself."""
        self._gone()

    def returned(self) -> None:
        """Its bytes went another way (copied into a section): the area is free again."""
        self.busy = False
        self._gone()
        self._unlend(self.loan)

    def _finished(self, unsent: bool) -> None:
        # The loan ends unless a send at work on the view ends it (unclaim, returned). Ending
        # it here costs nothing when a post in place ended it already (the number is that
        # post's, never another loan's), and it is what gives the area back when a signal
        # handler cut a refused post short before unclaim().
        if unsent or not self.busy:
            self._unlend(self.loan)


class SectionPool:
    """The sections this side lends the peer over one connection, reused message after message.

    All methods except ``give_back`` run under the connection's lock.
    """

    def __init__(self, ledger: OutboundLedger, *, backend: str) -> None:
        self.ledger = ledger
        self.backend = backend
        self._sections: dict[int, Section] = {}
        # Unsent views given back from any thread (list.append and pop(0) are atomic as a
        # deque's are; a list costs 56 bytes empty, a deque 760, on every connection).
        self._returns: list[Slot] = []
        self._retired: list[int] = []
        self.closed = False
        # The process whose sections these are: a child forked since shares the connection, but
        # its copy of the ledger would place ranges (and number sections) the parent places too.
        self._pid = process_id()

    def give_back(self, slot: Slot) -> None:
        self._returns.append(slot)

    def _drain_returns(self) -> None:
        while self._returns:
            slot = self._returns.pop(0)
            if self.ledger.cancel(slot):
                self._close_section(slot.section_id)

    def reserve(self, length: int, secure: bool) -> SectionView | None:
        """Space for ``length`` bytes, or None when the sender must wait for releases."""
        if self.closed:
            raise ConnectionClosed("the connection is closed")
        self._check_owner("send a large message or a view on it")
        self._drain_returns()
        placed = self.ledger.place(length, secure)
        self._retire(self.ledger.take_retired())  # dropped by the ledger: unmap them here too
        if placed is None:
            return None
        if isinstance(placed, Grow):
            placed = self._grow(placed, length)
        return SectionView(self, self._sections[placed.section_id], placed)

    def _check_owner(self, what: str) -> None:
        if process_id() != self._pid:
            raise SectionError(f"this connection's sections belong to pid {self._pid}: a forked child cannot "
                               f"{what} (connect from the child)")

    def _retire(self, section_ids: list[int]) -> list[int]:
        """Unmap sections the ledger retired; the ids the peer must hear of (SECTION_CLOSE)."""
        for section_id in section_ids:
            self._close_section(section_id)
        known = self.ledger.peer_knows(section_ids)
        self._retired += known
        return known

    def _grow(self, plan: Grow, length: int) -> Slot:
        self._retire(list(plan.retire))
        try:
            section = Section.create(plan.size, backend="memfd" if plan.secure else self.backend, secure=plan.secure)
        except BaseException as exc:
            # Whatever failed (posix_ipc reports EFBIG as ValueError), the planned
            # bytes go back to the connection's quota and the port's budget.
            self.ledger.abandon(plan)
            if isinstance(exc, (OSError, ValueError, posix_ipc.Error)) and not isinstance(exc, QuotaExceeded):
                raise QuotaExceeded(f"cannot create a {plan.size}-byte section: {exc}") from None
            raise
        self.ledger.commit(plan)
        self._sections[plan.section_id] = section
        return self.ledger.allocate_in(plan.section_id, length)

    def take_retired(self) -> list[int]:
        """Ids of sections retired since the last call: the peer must hear of them first."""
        retired, self._retired = self._retired, []
        return retired

    def requeue_retired(self, retired: list[int]) -> None:
        """The frame that named ``retired`` never left: tell the peer with the next one."""
        self._retired[:0] = retired

    def prepare(self, view: SectionView) -> tuple[SectionNew | None, int | None]:
        """Hand ``view`` over for sending: what to announce, and the fd to pass (if new).

        The view's memory is released here: once sent, the range belongs to
        the peer until it releases it. A secure view's section is write-sealed.
        """
        view.claim()
        section = self._sections[view.section_id]
        view.release()
        if view.secure:
            try:
                section.seal()
            except SectionError:
                view.sent = False
                if self.ledger.cancel(view.slot):
                    self._close_section(view.section_id)
                raise
        self.ledger.mark_sent(view.slot)
        view.announced = self.ledger.needs_announce(view.section_id)
        if not view.announced:
            return None, None
        self.ledger.set_announced(view.section_id, True)
        return SectionNew(view.section_id, _SECURE if view.secure else 0, section.size), section.fd

    def after_send(self, view: SectionView, written: bool) -> None:
        """The frame went out (or, if not ``written``, nothing of it did)."""
        if not written:
            if view.announced:
                self.ledger.set_announced(view.section_id, False)
            self.ledger.unsend(view.slot)
            if self.ledger.cancel(view.slot):
                self._close_section(view.section_id)
        elif view.secure:
            # The peer holds its own fd now; a sealed one-shot needs nothing of ours.
            section = self._sections.get(view.section_id)
            if section is not None:
                section.close()

    def place_copy(self, length: int, fill: Callable[[memoryview], None]) -> Slot | None:
        """``fill`` a range of ``length`` bytes in a section the peer maps already; the range
        counts as sent. None (nothing done) when that takes more: use ``reserve``.

        The small automatic body's way: no view in between, since nothing else touches
        the range before its frame is written (the caller holds the connection's lock).
        """
        if self.closed or self._returns or self._retired or process_id() != self._pid:
            return None
        slot = self.ledger.place_known(length)
        if slot is None:
            return None
        try:
            self._sections[slot.section_id].fill(slot.offset, length, fill)
        except BaseException:
            self.unplace(slot)
            raise
        return slot

    def unplace(self, slot: Slot) -> None:
        """The frame naming ``slot`` (from ``place_copy``) was never written: the range is ours."""
        self.ledger.unsend(slot)
        if self.ledger.cancel(slot):
            self._close_section(slot.section_id)

    def released(self, entries: list[Release]) -> None:
        """The peer's RELEASE frame: those ranges are ours again."""
        self._drain_returns()
        for entry in entries:
            if self.ledger.release(entry):
                self._close_section(entry.section_id)

    def _close_section(self, section_id: int) -> None:
        section = self._sections.pop(section_id, None)
        if section is not None:
            section.close()

    def trim(self) -> list[int]:
        """Unmap every idle pooled section (memory back to the system); ids to announce.

        Refused in a forked child: its SECTION_CLOSE would make the peer unmap the parent's
        sections, and the parent's next message naming one dropped the connection."""
        self._check_owner("retire its parent's sections")
        # Views released unsent (from any thread) hold their ranges until drained: their
        # sections are idle too, and a trim that skipped them kept memory (and, for another
        # connection waiting on the port's budget, the budget) that nothing else would free.
        self._drain_returns()
        return self._retire(self.ledger.retire_idle())

    def close(self) -> None:
        self.closed = True
        for section_id in list(self._sections):
            self._close_section(section_id)
        self.ledger.clear()
        self._returns.clear()


# -- the receiver's side -------------------------------------------------------------------


class PeerSections:
    """The sections the peer lent us over one connection, mapped read-only.

    ``add``/``resolve``/``retire``/``take_releases`` run under the connection's
    lock; a view's release (from any thread, or its garbage collection) only
    queues the range, and ``wake`` asks the driver to send the queued releases.
    """

    def __init__(self, ledger: InboundLedger, *, allow_unsealed: bool) -> None:
        self.ledger = ledger
        self.allow_unsealed = allow_unsealed
        self._sections: dict[int, Section] = {}
        # Ranges released (by the application or a collected view) and not yet told, each
        # with the pid of the process that read it (see _give_back). A list, not a deque (760
        # bytes empty, on every connection): appended from any thread, taken in one slice.
        self.pending: list[tuple[int, int, int]] = []
        self.wake: Callable[[], None] | None = None
        # Called from the finalizer of a view dropped unreleased (any thread): may only schedule.
        self.dropped: Callable[[], None] | None = None
        # Automatic section bodies received and not yet copied out: while some
        # remain (the rest of one read), their releases can go out together.
        self.copies_held = 0
        self._count_lock = threading.Lock()
        self.closed = False

    def add(self, new: SectionNew, fd: int) -> None:
        """Map a section the peer announced; always consumes ``fd``."""
        try:
            self.ledger.add(new)
        except BaseException:
            os.close(fd)
            raise
        try:
            section = Section.adopt(fd, new.size, secure=bool(new.flags & _SECURE),
                                    allow_unsealed=self.allow_unsealed)
        except OSError as exc:
            self.ledger.forget(new.section_id)
            raise ProtocolError(f"cannot map section {new.section_id}: {exc}") from None
        except BaseException:
            self.ledger.forget(new.section_id)
            raise
        self._sections[new.section_id] = section

    def resolve(self, ref: SectionRef, *, copy: bool = False) -> View:
        """The read-only view a peer's reference names, after checking it.

        ``copy``: the body of an automatic section message, counted in
        ``copies_held`` until copied out (or dropped).
        """
        self.ledger.take(ref)
        section = self._sections[ref.section_id]
        key = (ref.section_id, ref.offset, process_id())
        if not copy:
            return section.view(ref.offset, ref.length, on_gone=lambda: self._give_back(key), wake=self._wake,
                                dropped=self._dropped)
        with self._count_lock:
            self.copies_held += 1

        def gone() -> None:
            with self._count_lock:
                self.copies_held -= 1
            self._give_back(key)

        return section.view(ref.offset, ref.length, on_gone=gone, wake=self._wake, dropped=self._dropped)

    def copy_out(self, ref: SectionRef) -> bytes:
        """The bytes a peer's reference names, after checking it; the range is given back at once.

        For small automatic bodies: a copy now costs less than the view, its
        release hooks and a later copy, and frees the sender's space sooner.
        """
        self.ledger.take(ref)
        section = self._sections[ref.section_id]
        try:
            data = section.read(ref.offset, ref.length)
        finally:
            self.pending.append((ref.section_id, ref.offset, process_id()))
        return data

    def _give_back(self, key: tuple[int, int, int]) -> None:
        # A range read before a fork is the parent's to give back, even when the child lets go of
        # its copy of the view: the peer would write over memory the parent still reads.
        if key[2] == process_id():
            self.pending.append(key)

    def _wake(self) -> None:
        if self.wake is not None and not self.closed:
            self.wake()

    def _dropped(self) -> None:
        if self.dropped is not None and not self.closed:
            self.dropped()


    def take_releases(self) -> list[Release]:
        """Ranges our side finished with since the last call, to tell the peer."""
        entries: list[Release] = []
        if self.closed:
            self.pending.clear()
            return entries
        pid = process_id()
        pending = self.pending
        # Only this (locked) side takes from the front; other threads append meanwhile, and
        # what they append after ``count`` stays for the next call.
        count = len(pending)
        taken = pending[:count]
        del pending[:count]
        for section_id, offset, reader in taken:
            if reader != pid:
                continue  # queued before a fork, in the parent: the parent tells the peer
            entry, finished = self.ledger.release(section_id, offset)
            entries.append(entry)
            if finished:
                self._sections.pop(section_id).close()
        return entries

    def retire(self, section_ids: list[int]) -> None:
        for section_id in section_ids:
            self.ledger.close(section_id)
            self._sections.pop(section_id).close()

    def close(self) -> None:
        self.closed = True
        for section in self._sections.values():
            section.close()
        self._sections.clear()
        self.ledger.clear()
        self.pending.clear()


class ConnectionSections:
    """Everything about sections on one connection, for ``protocol.Channel``."""

    def __init__(self, *, inline_threshold: int, pool: SectionPool, peer: PeerSections,
                 secure: bool = False, direct_memory: bool = True) -> None:
        self.inline_threshold = inline_threshold
        self.pool = pool
        self.peer = peer
        self.secure = secure
        self.direct_memory = direct_memory

    @classmethod
    def build(cls, *, inline_threshold: int, send_quota: int, recv_quota: int, max_length: int,
              section_size: int, backend: str, allow_unsealed: bool, secure: bool,
              budget: Any = None, direct_memory: bool = True) -> ConnectionSections:
        pool = SectionPool(OutboundLedger(quota=send_quota, section_size=section_size, budget=budget),
                           backend=backend)
        peer = PeerSections(InboundLedger(quota=recv_quota, max_length=max_length, require_secure=secure),
                            allow_unsealed=allow_unsealed)
        return cls(inline_threshold=inline_threshold, pool=pool, peer=peer, secure=secure,
                   direct_memory=direct_memory)

    def close(self) -> None:
        self.pool.close()
        self.peer.close()

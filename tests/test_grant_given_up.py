"""A write grant outlives the request its client gave up on, until the server can no longer write.

A client that cancels a granted request, times out waiting for it, or drops its PendingRequest
has told the server nothing it has read yet: the server may still write into the grant directly
(process_vm_writev) until it reads the CANCEL or replies. The client's runtime must keep the
buffer pinned until then, or the application frees it, reuses the memory for other data, and
the server's late write lands in that data.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import sys
from pathlib import Path

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "grant_late_peers.py"
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_PROT_RW, _MAP_PRIVATE_ANON_FIXED = 0x3, 0x2 | 0x20 | 0x10


def _address(area: mmap.mmap) -> int:
    pointer = ctypes.c_char.from_buffer(area)
    address = ctypes.addressof(pointer)
    del pointer  # its export would keep the mapping from closing
    return address


def _give_up(pending: alpc.PendingRequest, how: str) -> None:
    if how == "cancel":
        assert pending.cancel()
    elif how == "timeout":
        try:
            pending.result(timeout=0.05)
        except alpc.Timeout:
            pass  # no traceback kept: it would hold the grant
        else:
            raise AssertionError("the server answered before it was told to")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["cancel", "timeout", "drop"])
def test_a_server_write_after_the_client_gave_up_never_lands_in_reused_memory(
        broker, config, spawn, runtime_dir, how) -> None:  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(PEERS), "late-writer", f"svc.grantlate.{how}", "--runtime-dir",
                         str(runtime_dir)])
    server.expect("READY")
    area = mmap.mmap(-1, PAGE)
    area.write(b"\x11" * PAGE)
    address = _address(area)
    with alpc.connect(f"svc.grantlate.{how}", config=config, timeout=5) as comm:
        pending = comm.start_request(b"write", grant=alpc.MemoryGrant(area, read=False, write=True), timeout=5)
        server.expect("GOT")
        _give_up(pending, how)
        del pending
        gc.collect()
        try:
            area.close()  # the application frees the buffer it granted...
            freed = True
        except BufferError:
            freed = False  # ...which the runtime still holds: the server may still write into it
        if freed:
            # ...and the memory holds other data now (at the very same address, for certain).
            assert _libc.mmap(address, PAGE, _PROT_RW, _MAP_PRIVATE_ANON_FIXED, -1, 0) == address
            ctypes.memset(address, 0x22, PAGE)
        server.send("go")
        (wrote,) = server.expect("WROTE")
        comm.ping(timeout=10)  # the server's late reply comes before its PONG
        if freed:
            other = ctypes.string_at(address, 16)
            _libc.munmap(address, PAGE)
            assert other == b"\x22" * 16, f"the server's late write ({wrote}) landed in memory the client reused"
        else:
            # The late reply ended the grant: the buffer is the application's again.
            gc.collect()
            area.close()


@pytest.mark.timeout(60)
def test_a_server_write_already_checked_when_the_cancel_is_answered_never_lands_in_reused_memory(
        broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    """The server's runtime checked the grant and is about to write when its reader thread
    takes the client's CANCEL: its answer to the cancel must not reach the client (which then
    lets the buffer go) before that write is done."""
    server = spawn.argv([sys.executable, str(PEERS), "racing-writer", "svc.grantlate.race", "--runtime-dir",
                         str(runtime_dir)])
    server.expect("READY")
    area = mmap.mmap(-1, PAGE)
    area.write(b"\x11" * PAGE)
    address = _address(area)
    with alpc.connect("svc.grantlate.race", config=config, timeout=5) as comm:
        pending = comm.start_request(b"write", grant=alpc.MemoryGrant(area, read=False, write=True), timeout=5)
        server.expect("CHECKED")
        assert pending.cancel()
        del pending
        try:
            comm.ping(timeout=1)  # once it is answered, the server has read (and answered) the CANCEL
        except alpc.Timeout:
            pass  # the server holds its answers back while the write is under way: fine
        gc.collect()
        try:
            area.close()
            freed = True
        except BufferError:
            freed = False
        if freed:
            assert _libc.mmap(address, PAGE, _PROT_RW, _MAP_PRIVATE_ANON_FIXED, -1, 0) == address
            ctypes.memset(address, 0x22, PAGE)
        server.send("go")
        (wrote,) = server.expect("WROTE")
        if freed:
            other = ctypes.string_at(address, 16)
            _libc.munmap(address, PAGE)
            assert other == b"\x22" * 16, f"the server's late write ({wrote}) landed in memory the client reused"
        else:
            comm.ping(timeout=10)  # the server's answer to the cancel comes before its PONG
            gc.collect()
            area.close()
        server.send("bye")

"""A POSIX section the sender lends cannot be truncated by its receiver.

A memfd section is sealed against shrinking and growing (and the peer's writes), so whoever
holds its fd cannot hurt the sender. A POSIX section cannot be sealed: the README warns the
*receiver* (it maps one only with ``allow_unsealed_sections``), but the fd the sender passed
was its own read-write one, so any process the receiver gives it to, of any uid, could
ftruncate it and the sender died of SIGBUS writing its next message there ("a client:
nothing, every byte, fd and count it sends is checked"). The receiver maps sections
read-only: it now gets a read-only fd, which ftruncate refuses.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

import alpc
from alpc import section as section_module

pytestmark = pytest.mark.timeout(60)

SECTION_PEERS = Path(__file__).resolve().parent / "section_peers.py"
MIB = 1 << 20
NOBODY = 65534


def _truncated_by_another_uid(fd: int) -> bool:
    """Hand ``fd`` to a process of uid 65534 (as a hostile client could): can it truncate it?"""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.ftruncate(fd, 0)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand the fd to another uid")
def test_a_receiver_cannot_truncate_a_posix_section_under_its_sender(  # type: ignore[no-untyped-def]
        broker, config, spawn, runtime_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    server = spawn.argv([sys.executable, str(SECTION_PEERS), "server", "svc.views.posix", "--runtime-dir",
                         str(runtime_dir), "--section-backend", "posix"])
    server.expect("READY")
    kept: list[int] = []
    check = section_module.check_peer_fd

    def keep_a_copy(fd: int, size: int, **options: bool) -> int:
        kept.append(os.dup(fd))  # what a hostile receiver does with the fd it was passed
        return check(fd, size, **options)

    monkeypatch.setattr(section_module, "check_peer_fd", keep_a_copy)
    trusting = dataclasses.replace(config, allow_unsealed_sections=True)
    try:
        with alpc.connect("svc.views.posix", config=trusting, timeout=5) as comm:
            assert len(comm.request(f"cmd:big:{MIB}".encode(), timeout=10).data) == MIB
            assert len(kept) == 1
            truncated = _truncated_by_another_uid(kept[0])
            # The server writes its next reply into the same pooled section.
            try:
                reply = comm.request(f"cmd:big:{MIB}".encode(), timeout=10)
            except alpc.PeerGone:
                server.proc.wait(10)
                pytest.fail(f"the server died writing into its truncated section (exit {server.proc.returncode})")
            assert len(reply.data) == MIB
        assert not truncated
        assert server.proc.poll() is None
    finally:
        for fd in kept:
            os.close(fd)

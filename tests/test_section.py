"""Sections themselves: both backends, the seals, what a receiver refuses, mapping lifetimes."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import sys
from pathlib import Path

import posix_ipc
import pytest

import alpc
from alpc.errors import ProtocolError, SectionError
from alpc.section import F_SEAL_FUTURE_WRITE, Section, shm_prefix, sweep_stale_names

SECTION_PEERS = Path(__file__).resolve().parent / "section_peers.py"
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def shm_names() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(shm_prefix())}


def test_a_pooled_memfd_is_sealed_so_only_its_owner_writes() -> None:
    with Section.create(8192, backend="memfd") as section:
        seals = fcntl.fcntl(section.fd, fcntl.F_GET_SEALS)
        assert seals & SIZE_SEALS == SIZE_SEALS and seals & F_SEAL_FUTURE_WRITE
        with section.view(0, 5) as memory:
            memory[:] = b"hello"  # the owner's own mapping stays writable
        with pytest.raises(PermissionError):
            os.ftruncate(section.fd, 100)
        with pytest.raises(PermissionError):
            mmap.mmap(section.fd, 8192)  # a writable mapping through the peer's copy of the fd
        peer = Section.adopt(os.dup(section.fd), 8192, secure=False, allow_unsealed=False)
        with peer.view(0, 5) as memory:
            assert bytes(memory) == b"hello" and memory.readonly
        peer.close()


def test_a_secure_section_is_immutable_once_sealed() -> None:
    section = Section.create(4096, backend="memfd", secure=True)
    view = section.view(0, 10)
    view.memory[:] = b"0123456789"
    with pytest.raises(SectionError, match="release every view"):
        section.seal()
    view.release()
    hostile = os.dup(section.fd)  # what a hostile sender would keep
    section.seal()
    try:
        assert fcntl.fcntl(hostile, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
        with pytest.raises(PermissionError):
            mmap.mmap(hostile, 4096)
        with pytest.raises(PermissionError):
            os.pwrite(hostile, b"changed", 0)
        received = Section.adopt(os.dup(section.fd), 4096, secure=True, allow_unsealed=False)
        with received.view(0, 10) as memory:
            assert bytes(memory) == b"0123456789"
        received.close()
    finally:
        os.close(hostile)
        section.close()


def _unsealed_memfd(size: int) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_the_receiver_refuses_what_could_hurt_it() -> None:
    with pytest.raises(ProtocolError, match="not sealed"):
        Section.adopt(_unsealed_memfd(4096), 4096, secure=False, allow_unsealed=False)
    posix = posix_ipc.SharedMemory(f"/{shm_prefix()}hostile", posix_ipc.O_CREX, mode=0o600, size=4096)
    posix.unlink()
    with pytest.raises(ProtocolError, match="not sealed"):
        Section.adopt(posix.fd, 4096, secure=False, allow_unsealed=False)
    with Section.create(4096) as sealed:
        with pytest.raises(ProtocolError, match="announced as 8192"):
            Section.adopt(os.dup(sealed.fd), 8192, secure=False, allow_unsealed=False)
        with pytest.raises(ProtocolError, match="not write-sealed"):
            Section.adopt(os.dup(sealed.fd), 4096, secure=True, allow_unsealed=False)
    left, right = socket.socketpair()
    with pytest.raises(ProtocolError, match="not a shared-memory file"):
        Section.adopt(left.detach(), 4096, secure=False, allow_unsealed=False)
    right.close()
    # The fd is consumed either way (the leak check would catch it otherwise);
    # a trusting receiver maps an unsealed section.
    trusted = Section.adopt(_unsealed_memfd(4096), 4096, secure=False, allow_unsealed=True)
    assert trusted.backend == "posix"
    trusted.close()


def test_views_outlive_their_section_and_unmap_with_the_last() -> None:
    section = Section.create(4096)
    view = section.view(100, 10)
    view.memory[:] = b"x" * 10
    section.close()  # the connection went away
    assert bytes(view.memory) == b"x" * 10
    derived = view.memory[2:4]
    view.release()  # an application still holds a derived memoryview: no unmap under it
    assert bytes(derived) == b"xx"
    del derived
    assert view.released
    with pytest.raises(SectionError):
        view.tobytes()


def test_view_ranges_are_checked() -> None:
    with Section.create(4096) as section:
        for offset, length in ((0, 0), (4000, 100), (4097, 1)):
            with pytest.raises(SectionError, match="outside"):
                section.view(offset, length)
        assert len(section.view(4000)) == 96


def test_backend_rules() -> None:
    with pytest.raises(SectionError, match="named sections use backend='posix'"):
        Section.create(4096, backend="memfd", named=True)
    with pytest.raises(SectionError, match="memfd"):
        Section.create(4096, backend="posix", secure=True)
    with pytest.raises(SectionError, match="positive size"):
        Section.create(0)
    with pytest.raises(SectionError, match="no section named"):
        Section.open(f"/{shm_prefix()}missing")


def test_an_unnamed_posix_section_leaves_no_name(monkeypatch: pytest.MonkeyPatch) -> None:
    before = shm_names()
    with Section.create(4096, backend="posix") as section:
        assert section.name is None and shm_names() == before
        with section.view(0, 3) as memory:
            memory[:] = b"abc"


def test_a_named_section_is_private_prefixed_and_unlinked_by_its_creator() -> None:
    section = Section.create(4096, backend="posix", named=True)
    try:
        assert section.name is not None
        entry = section.name.lstrip("/")
        assert entry.startswith(f"{shm_prefix()}{os.getpid()}-")
        assert os.stat(f"/dev/shm/{entry}").st_mode & 0o777 == 0o600
        with pytest.raises(posix_ipc.ExistentialError):  # O_CREX: never opens someone else's object
            posix_ipc.SharedMemory(section.name, posix_ipc.O_CREX, size=4096)
        other = Section.open(section.name, writable=True)
        with other.view(0, 4) as memory:
            memory[:] = b"ping"
        other.close()
    finally:
        section.unlink()
    with section.view(0, 4) as memory:
        assert bytes(memory) == b"ping"
    section.close()
    assert entry not in os.listdir("/dev/shm")


def test_the_prefix_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPC_SHM_PREFIX", "../evil")
    with pytest.raises(SectionError, match="ALPC_SHM_PREFIX"):
        shm_prefix()


def test_a_third_process_opens_a_named_section_by_name(spawn) -> None:  # type: ignore[no-untyped-def]
    creator = spawn.argv([sys.executable, str(SECTION_PEERS), "named-create", "65536"])
    (name,) = creator.expect("NAME")
    opener = spawn.argv([sys.executable, str(SECTION_PEERS), "named-open", name])
    assert opener.expect("OPENED") == ["alpcname", "65536"]
    creator.send("unlink")  # every party holds it: the name can go
    creator.expect("UNLINKED")
    assert name.lstrip("/") not in os.listdir("/dev/shm")
    opener.proc.stdin.close()  # type: ignore[union-attr]
    assert opener.expect("STILL") == ["alpcname"]


def test_names_of_a_killed_creator_are_swept(spawn) -> None:  # type: ignore[no-untyped-def]
    creator = spawn.argv([sys.executable, str(SECTION_PEERS), "named-create", "4096"])
    (name,) = creator.expect("NAME")
    creator.kill()
    assert name.lstrip("/") in os.listdir("/dev/shm")
    assert sweep_stale_names(pid=os.getpid()) == []  # a live creator's names are never touched
    assert sweep_stale_names(pid=creator.pid) == [name.lstrip("/")]
    assert name.lstrip("/") not in os.listdir("/dev/shm")


def test_public_names() -> None:
    assert alpc.Section is Section
    assert issubclass(alpc.SectionError, ValueError)

"""Faults of the section path and direct client memory that a peer or bad luck can cause.

Real processes where a process boundary is crossed (the server runs
tests/section_peers.py, the hostile client speaks the wire from this process
as tests/hostile/test_hostile_sections.py does); no sleeps for synchronisation.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest

import alpc
from alpc.wire import (
    Attributes,
    MessageType,
    SectionNew,
    SectionRef,
    encode_attributes,
    encode_header,
)

SECTION_PEERS = Path(__file__).resolve().parent / "section_peers.py"


def frame(kind: MessageType, attrs: Attributes | None = None, data: bytes = b"", message_id: int = 1,
          n_fds: int = 0) -> list[bytes]:
    raw = encode_attributes(attrs) if attrs is not None else b""
    return [encode_header(kind, len(data), message_id=message_id, attr_length=len(raw), n_fds=n_fds), raw, data]


def tagged_memfd(tag: str, size: int = 4096) -> int:
    """A memfd sealed like alpc's own sections, with a name we can find in another process's fd table."""
    fd = os.memfd_create(tag, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def holders(pid: int, tag: str) -> list[str]:
    """The fds of process ``pid`` open on a memfd named ``tag``."""
    found = []
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if f"memfd:{tag}" in target:
            found.append(f"{entry} -> {target}")
    return found


# -- the fds of the frames after a bad one in the same read are closed ---------------------


@pytest.mark.timeout(60)
def test_a_bad_frame_does_not_leak_the_section_fd_of_the_next_frame_in_the_same_read(
        broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(SECTION_PEERS), "server", "svc.fault1", "--runtime-dir",
                         str(runtime_dir), "--max-section-bytes", str(4 << 20), "--section-size", str(1 << 20)])
    server_pid = int(server.expect("READY")[0])
    tag = f"faultleak{secrets.token_hex(6)}"
    hostile = alpc.connect("svc.fault1", config=config, timeout=5)
    fd = tagged_memfd(tag)
    try:
        # One write: a request naming a section never announced (a protocol error), then a
        # well-formed request introducing a section, whose fd rides on the same write.
        bad = frame(MessageType.REQUEST, Attributes(ref=SectionRef(9, 0, 0, 100)), message_id=1)
        good = frame(MessageType.REQUEST, Attributes(ref=SectionRef(1, 0, 0, 100), new=SectionNew(1, 0, 4096)),
                     message_id=2, n_fds=1)
        hostile._stream.send(bad + good, [fd])
    finally:
        os.close(fd)
    died = server.expect("CLIENT_DIED")
    assert "unknown_section" in died[1], died
    hostile.close()
    # The server is done with that read (it answered an honest client since).
    with alpc.connect("svc.fault1", config=config, timeout=5) as honest:
        assert honest.request(b"x" * 1000, timeout=10).data.startswith(b"sha:")
    assert holders(server_pid, tag) == [], "the server still holds the hostile client's memfd"


HOSTILE_PEERS = Path(__file__).resolve().parent / "hostile" / "hostile_peers.py"


@pytest.mark.timeout(60)
def test_a_refused_section_does_not_leak_the_handles_of_its_frame(
        broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(HOSTILE_PEERS), "server", "svc.fault2", "--runtime-dir",
                         str(runtime_dir), "--kinds", "memfd"])
    server_pid = int(server.expect("READY")[0])
    tag = f"faultleak{secrets.token_hex(6)}"
    hostile = alpc.connect("svc.fault2", config=config, timeout=5)
    section = alpc.Section.create(4096)
    handle = os.memfd_create(tag, os.MFD_CLOEXEC)
    try:
        # A request introducing a section whose announced size lies (refused when mapped),
        # with one handle (a memfd, a kind the port takes) after the section's fd.
        attrs = Attributes(ref=SectionRef(1, 0, 0, 100), new=SectionNew(1, 0, 1 << 20))
        hostile._stream.send(frame(MessageType.REQUEST, attrs, n_fds=2), [section.fd, handle])
    finally:
        os.close(handle)
        section.close()
    died = server.expect("CLIENT_DIED")
    assert "announced_as" in died[1], died
    hostile.close()
    with alpc.connect("svc.fault2", config=config, timeout=5) as honest:
        assert honest.request(b"echo:fine", timeout=10).data == b"FINE"
    assert holders(server_pid, tag) == [], "the server still holds the handle of the refused frame"


# -- a negative offset is outside the grant (the pure-Python twin let it through) ---------

GRANT_PEERS = Path(__file__).resolve().parent / "grant_peers.py"


@pytest.mark.timeout(60)
def test_a_server_cannot_write_before_the_granted_buffer(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(GRANT_PEERS), "grant-server", "svc.fault3", "--runtime-dir",
                         str(runtime_dir)])
    server.expect("READY")
    whole = bytearray(b"\x11" * 256)
    granted = memoryview(whole)[128:192]  # the client lends only these 64 bytes
    with alpc.connect("svc.fault3", config=config, timeout=5) as comm:
        reply = comm.request(b"write-at:-16:16", grant=alpc.MemoryGrant(granted, read=False, write=True),
                             timeout=10).data.decode()
        granted.release()
    assert whole[:128] == b"\x11" * 128, f"the server wrote outside the grant ({reply})"
    assert reply.startswith("error:SectionError"), reply


@pytest.mark.timeout(60)
def test_a_server_cannot_read_before_the_granted_buffer(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(GRANT_PEERS), "grant-server", "svc.fault4", "--runtime-dir",
                         str(runtime_dir)])
    server.expect("READY")
    whole = bytearray(b"S" * 128 + b"\x22" * 64)  # "S": the client's secret, right before the grant
    granted = memoryview(whole)[128:192]
    with alpc.connect("svc.fault4", config=config, timeout=5) as comm:
        reply = comm.request(b"read-at:-16:16", grant=alpc.MemoryGrant(granted, read=True), timeout=10).data.decode()
        granted.release()
    assert (b"S" * 16).hex() not in reply, f"the server read outside the grant: {reply}"
    assert reply.startswith("error:SectionError"), reply


# -- a section retired for a growth the budget then refuses is unmapped -------------------


@pytest.mark.timeout(30)
def test_a_section_retired_when_the_budget_race_is_lost_is_unmapped() -> None:
    from alpc.ledger import Budget, OutboundLedger
    from alpc.section import SectionPool

    class RacedBudget(Budget):
        """Another connection takes the room between available() and take(), once."""

        def __init__(self, limit: int) -> None:
            super().__init__(limit)
            self.lose_next = False

        def take(self, size: int) -> bool:
            if self.lose_next:
                self.lose_next = False
                return False
            return super().take(size)

    budget = RacedBudget(8192)
    pool = SectionPool(OutboundLedger(quota=8192, section_size=4096, budget=budget), backend="memfd")
    try:
        view = pool.reserve(100, False)
        assert view is not None and view.section_id == 1
        first = pool._sections[1]
        first_fd = first.fd
        pool.ledger.set_announced(1, True)  # the peer maps it (an earlier message named it)
        view.release()  # unsent: section 1 is idle again
        budget.lose_next = True
        assert pool.reserve(8000, False) is None  # needs section 1's room; the budget race is lost
        assert pool.take_retired() == [1]  # the peer is told section 1 is gone (it unmaps it) ...
        assert 1 not in pool.ledger.section_ids  # ... and the ledger no longer counts it
        # ... so this side must not keep it either: mapped, with its fd open, outside every quota.
        assert first.closed, "section 1 was retired but its mapping and fd are still held"
    finally:
        pool.close()
    with pytest.raises(OSError):
        os.fstat(first_fd)


# -- a named section whose creation fails halfway leaves no name in /dev/shm -------------


@pytest.mark.timeout(30)
def test_a_named_section_that_fails_to_be_created_leaves_no_name() -> None:
    import resource

    from alpc.section import Section, shm_prefix

    def names() -> set[str]:
        return {name for name in os.listdir("/dev/shm") if name.startswith(shm_prefix())}

    before = names()
    first, second = os.dup(0), os.dup(0)
    os.close(first)
    os.close(second)
    assert second == first + 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for exactly one more fd: shm_open gets it, the dup that follows fails (EMFILE).
    resource.setrlimit(resource.RLIMIT_NOFILE, (second, hard))
    try:
        with pytest.raises(OSError):
            Section.create(4096, backend="posix", named=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    left = names() - before
    for name in left:
        os.unlink(f"/dev/shm/{name}")
    assert not left, f"a failed create left {left} in /dev/shm"


# -- the size of a peer's section is read after its seals --------------------------------


@pytest.mark.timeout(30)
def test_a_section_truncated_and_sealed_between_fstat_and_the_seal_check_is_a_protocol_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The hostile sender acts between the receiver's fstat and its F_GET_SEALS (injected here):
    it truncates the memfd to 0, then seals its size. The stale size passes the check; CPython's
    mmap then refuses (ValueError), which is no ProtocolError, so it escapes Connection.receive."""
    import alpc.section as section_module
    from alpc.errors import ProtocolError
    from alpc.ledger import InboundLedger
    from alpc.section import PeerSections

    real = fcntl

    class Interleaved:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def fcntl(self, fd: int, cmd: int, *args: int) -> int:
            if cmd == real.F_GET_SEALS:
                os.ftruncate(fd, 0)
                real.fcntl(fd, real.F_ADD_SEALS, real.F_SEAL_SHRINK | real.F_SEAL_GROW)
            return real.fcntl(fd, cmd, *args)

    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    peer = PeerSections(InboundLedger(quota=1 << 20, max_length=1 << 20), allow_unsealed=False)
    monkeypatch.setattr(section_module, "fcntl", Interleaved())
    try:
        with pytest.raises(ProtocolError):
            peer.add(SectionNew(1, 0, 4096), fd)  # consumes fd
    finally:
        monkeypatch.undo()
        peer.close()
    assert peer.ledger.mapped == 0


# -- a grant is served in the memory of the process that connected, not of its sender -----


@pytest.mark.timeout(60)
def test_a_grant_from_a_forked_child_is_not_served_in_its_parents_memory(
        broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(GRANT_PEERS), "grant-server", "svc.fault8", "--runtime-dir",
                         str(runtime_dir)])
    server.expect("READY")
    client = spawn.argv([sys.executable, str(GRANT_PEERS), "fork-grant", "svc.fault8", "--runtime-dir",
                         str(runtime_dir)])
    client.expect("READY")
    reply, child_bytes = client.expect("CHILD")
    (parent_bytes,) = client.expect("PARENT")
    assert parent_bytes == "11" * 16, f"the server wrote into the parent's memory ({reply})"
    assert child_bytes == "ee" * 16 or reply.startswith("error:"), (reply, child_bytes)


# -- retirements named in a frame that was never written go with the next one ------------


@pytest.mark.timeout(30)
def test_retirements_of_a_section_message_that_was_not_written_still_reach_the_peer() -> None:
    from alpc.protocol import Channel
    from alpc.section import ConnectionSections
    from alpc.security import PeerCred

    mib = 1 << 20

    def sections() -> ConnectionSections:
        return ConnectionSections.build(inline_threshold=256, send_quota=2 * mib, recv_quota=2 * mib,
                                        max_length=2 * mib, section_size=mib, backend="memfd",
                                        allow_unsealed=False, secure=False)

    def deliver(frames: list[bytes], fds: list[int], to: Channel) -> list:  # type: ignore[type-arg]
        return to.receive(b"".join(bytes(f) for f in frames), [os.dup(fd) for fd in fds])

    peer = PeerCred(100, 1000, 1000)
    client = Channel(peer, send_limit=2 * mib, recv_limit=2 * mib, local_pid=1, sections=sections())
    server = Channel(peer, send_limit=2 * mib, recv_limit=2 * mib, local_pid=2, sections=sections())
    try:
        # A small body: section 1 (1 MiB) is created, mapped by the server, released, idle again.
        view = client.reserve(1000)
        view.memory[:] = b"a" * 1000
        _, frames, fds = client.section_message(MessageType.DATAGRAM, view, as_view=False)
        (message,) = deliver(frames, fds, server)
        client.section_sent(view, True)
        assert message.data == b"a" * 1000
        deliver(server.release_frames(server.take_releases()), [], client)
        # A 1.5 MiB body needs section 1's room: section 1 is retired, section 2 (2 MiB) made.
        size = 3 * mib // 2
        view = client.reserve(size)
        assert view is not None and view.section_id == 2
        view.memory[:] = b"b" * size
        _, frames, fds = client.section_message(MessageType.DATAGRAM, view, as_view=False)
        client.section_sent(view, False)  # the write timed out before a byte of it left
        # Sent again: the server must hear of section 1's retirement before section 2 comes.
        view = client.reserve(size)
        view.memory[:] = b"b" * size
        _, frames, fds = client.section_message(MessageType.DATAGRAM, view, as_view=False)
        (message,) = deliver(frames, fds, server)  # ProtocolError: section 2 exceeds the quota
        client.section_sent(view, True)
        assert message.size == size
    finally:
        client.release_resources()
        server.release_resources()


# -- a hostile server's fallback operations cannot pile up on the client ----------------------

FLOOD = 20_000


def _flood(spawn, runtime_dir: Path, config: alpc.Config, name: str, kind: str):  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(GRANT_PEERS), "flood-server", name, "--runtime-dir", str(runtime_dir),
                         "--kind", kind, "--count", str(FLOOD)])
    server.expect("READY")
    comm = alpc.connect(name, config=config, timeout=10)
    buffer = bytearray(b"\x11" * 64)
    pending = comm.start_request(b"go", grant=alpc.MemoryGrant(buffer, read=True, write=True), timeout=10)
    # The datagram was written after every grant frame: once it is here, all of them were filed.
    tracemalloc.start()
    try:
        done = comm.receive(timeout=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert done.data == b"done"
    queued = int(pending.id in comm._core._grant_reads)  # a GRANT_READ waiting for its answer
    return server, comm, pending, buffer, queued, peak


@pytest.mark.timeout(60)
def test_a_server_flooding_grant_reads_cannot_grow_the_clients_queue(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    server, comm, _, _, queued, peak = _flood(spawn, runtime_dir, config, "svc.flood.r", "read")
    server.expect("FLOODED")
    with comm:
        # An honest server has at most one fallback read per request waiting for its answer.
        assert queued <= 1, (f"{queued} GRANT_READ operations of {FLOOD} sent are queued on the client "
                             f"(peak {peak} bytes traced while reading them)")


@pytest.mark.timeout(60)
def test_a_server_flooding_grant_writes_cannot_grow_the_clients_queue(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    server, comm, pending, buffer, queued, peak = _flood(spawn, runtime_dir, config, "svc.flood.w", "write")
    server.expect("FLOODED")
    with comm:
        assert queued <= 1, (f"{queued} GRANT_WRITE operations of {FLOOD} sent are queued on the client "
                             f"(peak {peak} bytes traced while reading them)")
        assert pending.result(timeout=30).data == b"bye"
        assert buffer[:16] == b"\xee" * 16 and buffer[16:] == b"\x11" * 48  # the writes landed, in the grant


# -- a section growth that fails gives its budget back ----------------------------------------

# posix_ipc reports a size the kernel refuses (ftruncate: EFBIG) as ValueError, not OSError.
_CHILD = textwrap.dedent("""
    import resource, signal
    from alpc.ledger import Budget, OutboundLedger
    from alpc.section import SectionPool
    budget = Budget(1 << 20)
    pool = SectionPool(OutboundLedger(quota=1 << 20, section_size=65536, budget=budget), backend="posix")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    try:
        pool.reserve(10000, False)
        print("created")
    except Exception as exc:
        print("failed", type(exc).__name__)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    pool.close()
    print("available", budget.available())
""")


@pytest.mark.timeout(30)
def test_failed_posix_growth_gives_budget_back() -> None:
    """A posix section that cannot be created must not keep its bytes of the port budget."""
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=25,
                         env=dict(os.environ)).stdout.split("\n")
    assert out[0] == "failed QuotaExceeded", out
    assert out[1] == f"available {1 << 20}", out


@pytest.mark.timeout(10)
def test_failed_growth_of_any_kind_gives_budget_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever exception creating the section raises, the planned bytes go back to the budget."""
    from alpc import section as section_module
    from alpc.errors import QuotaExceeded
    from alpc.ledger import Budget, OutboundLedger
    from alpc.section import SectionPool

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("The size is too large")  # what posix_ipc raises for EFBIG

    budget = Budget(1 << 20)
    pool = SectionPool(OutboundLedger(quota=1 << 20, section_size=65536, budget=budget), backend="memfd")
    monkeypatch.setattr(section_module.Section, "create", classmethod(lambda cls, *a, **k: refuse()))
    with pytest.raises(QuotaExceeded):
        pool.reserve(10000, False)
    monkeypatch.undo()
    view = pool.reserve(10000, False)  # the pool still works afterwards
    assert view is not None
    view.release()
    pool.close()
    assert budget.available() == 1 << 20

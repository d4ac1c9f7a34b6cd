"""Hostile peers against a real server: bad section references, unsealed or truncated
sections, lying sizes, stray fds, forged releases. Each breaks only its own channel,
never the server (no SIGBUS), which keeps serving an honest client."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import posix_ipc
import pytest

import alpc
from alpc.section import Section, shm_prefix
from alpc.wire import (
    Attributes,
    MessageType,
    Release,
    SectionFlag,
    SectionNew,
    SectionRef,
    encode_attributes,
    encode_header,
    encode_releases,
    encode_section_ids,
)

SECTION_PEERS = Path(__file__).resolve().parent.parent / "section_peers.py"
VIEW = int(SectionFlag.VIEW)
SECURE = int(SectionFlag.SECURE)


def frame(kind: MessageType, attrs: Attributes | None = None, data: bytes = b"", message_id: int = 1,
          n_fds: int = 0) -> list[bytes]:
    raw = encode_attributes(attrs) if attrs is not None else b""
    return [encode_header(kind, len(data), message_id=message_id, attr_length=len(raw), n_fds=n_fds), raw, data]


def sealed(size: int = 4096) -> Section:
    return Section.create(size)


def unsealed_memfd(size: int = 4096) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


Send = Callable[[list[bytes], list[int]], None]


def unknown_section(send: Send) -> None:
    send(frame(MessageType.REQUEST, Attributes(ref=SectionRef(9, 0, 0, 100))), [])


def out_of_range(send: Send) -> None:
    with sealed() as section:
        attrs = Attributes(ref=SectionRef(1, 0, 4000, 200), new=SectionNew(1, 0, 4096))
        send(frame(MessageType.REQUEST, attrs, n_fds=1), [section.fd])


def overlapping(send: Send) -> None:
    with sealed() as section:
        first = Attributes(ref=SectionRef(1, VIEW, 0, 100), new=SectionNew(1, 0, 4096))
        send(frame(MessageType.REQUEST, first, n_fds=1) + frame(
            MessageType.REQUEST, Attributes(ref=SectionRef(1, VIEW, 50, 100)), message_id=2), [section.fd])


def unsealed_then_truncated(send: Send) -> None:
    fd = unsealed_memfd()
    try:
        attrs = Attributes(ref=SectionRef(1, 0, 0, 4000), new=SectionNew(1, 0, 4096))
        send(frame(MessageType.REQUEST, attrs, n_fds=1), [fd])
        os.ftruncate(fd, 0)  # would SIGBUS a receiver that had mapped it
    finally:
        os.close(fd)


def posix_shm_truncated(send: Send) -> None:
    shm = posix_ipc.SharedMemory(f"/{shm_prefix()}hostile-{os.getpid()}", posix_ipc.O_CREX, mode=0o600, size=4096)
    shm.unlink()
    try:
        attrs = Attributes(ref=SectionRef(1, 0, 0, 4000), new=SectionNew(1, 0, 4096))
        send(frame(MessageType.REQUEST, attrs, n_fds=1), [shm.fd])
        os.ftruncate(shm.fd, 0)
    finally:
        shm.close_fd()


def secure_but_writable(send: Send) -> None:
    with sealed() as section:
        attrs = Attributes(ref=SectionRef(1, SECURE, 0, 100), new=SectionNew(1, SECURE, 4096))
        send(frame(MessageType.REQUEST, attrs, n_fds=1), [section.fd])


def lying_size(send: Send) -> None:
    with sealed() as section:
        attrs = Attributes(ref=SectionRef(1, 0, 0, 100), new=SectionNew(1, 0, 1 << 20))
        send(frame(MessageType.REQUEST, attrs, n_fds=1), [section.fd])


def over_quota(send: Send) -> None:
    with sealed(8 << 20) as section:
        attrs = Attributes(ref=SectionRef(1, 0, 0, 100), new=SectionNew(1, 0, 8 << 20))
        send(frame(MessageType.REQUEST, attrs, n_fds=1), [section.fd])


def stray_fd(send: Send) -> None:
    with sealed() as section:
        send(frame(MessageType.DATAGRAM, data=b"x", n_fds=1), [section.fd])


def forged_release(send: Send) -> None:
    send(frame(MessageType.RELEASE, data=encode_releases([Release(1, 0, 64)]), message_id=0), [])


def close_while_held(send: Send) -> None:
    with sealed() as section:
        attrs = Attributes(ref=SectionRef(1, VIEW, 0, 100), new=SectionNew(1, 0, 4096))
        send(frame(MessageType.REQUEST, attrs, n_fds=1)
             + frame(MessageType.SECTION_CLOSE, data=encode_section_ids([1]), message_id=0), [section.fd])


def grant_write_to_a_server(send: Send) -> None:
    send(frame(MessageType.GRANT_WRITE, data=b"x", message_id=0), [])


@pytest.mark.parametrize(("attack", "reason"), [
    (unknown_section, "unknown_section"),
    (out_of_range, "outside_section"),
    (overlapping, "overlaps"),
    (unsealed_then_truncated, "not_sealed"),
    (posix_shm_truncated, "not_sealed"),
    (secure_but_writable, "not_write-sealed"),
    (lying_size, "announced_as"),
    (over_quota, "quota"),
    (stray_fd, "takes_at_most_0"),
    (forged_release, "release_in_unknown_section"),
    (close_while_held, "held"),
    (grant_write_to_a_server, "GRANT_WRITE"),
])
def test_a_hostile_client_loses_only_its_own_channel(broker, config, spawn, runtime_dir,  # type: ignore[no-untyped-def]
                                                      attack: Callable[[Send], None], reason: str) -> None:
    server = spawn.argv([sys.executable, str(SECTION_PEERS), "server", "svc.hostile", "--runtime-dir",
                         str(runtime_dir), "--hold-views", "--max-section-bytes", str(4 << 20),
                         "--section-size", str(1 << 20)])
    server.expect("READY")
    with alpc.connect("svc.hostile", config=config, timeout=5) as honest:
        hostile = alpc.connect("svc.hostile", config=config, timeout=5)
        attack(lambda frames, fds: hostile._stream.send(frames, fds))
        died = server.expect("CLIENT_DIED")
        assert died[0] == str(os.getpid()) and "protocol_error" in died[1] and reason in died[1], died
        assert server.proc.poll() is None  # alive: no SIGBUS, no crash
        payload = os.urandom(1 << 20)
        assert honest.request(payload, timeout=10).data.startswith(b"sha:")
        assert honest.request(b"small", timeout=10).data.startswith(b"sha:")
        hostile.close()
        server.send("release")
        server.expect("RELEASED")


def test_a_sealed_section_cannot_be_truncated_under_the_receiver(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(SECTION_PEERS), "server", "svc.sealed", "--runtime-dir",
                         str(runtime_dir), "--hold-views"])
    server.expect("READY")
    comm = alpc.connect("svc.sealed", config=config, timeout=5)
    with sealed() as section:
        with section.view(0, 100) as memory:
            memory[:] = b"y" * 100
        attrs = Attributes(ref=SectionRef(1, VIEW, 0, 100), new=SectionNew(1, 0, 4096))
        comm._stream.send(frame(MessageType.REQUEST, attrs, n_fds=1), [section.fd])
        server.expect("HOLDING")
        with pytest.raises(PermissionError):
            os.ftruncate(section.fd, 0)  # the kernel refuses: the receiver's mapping stays whole
    comm.close()  # its pool never knew the hand-made section, so a release would confuse it
    server.send("release")
    server.expect("RELEASED")
    with alpc.connect("svc.sealed", config=config, timeout=5) as other:
        assert other.request(b"still fine", timeout=10).data.startswith(b"sha:")

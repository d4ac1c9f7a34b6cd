"""A secure view's bytes never change, even on a receiver that trusts unsealed sections.

``allow_unsealed_sections=True`` lets a receiver map a peer's POSIX (unsealable) sections,
accepting that a trusted peer could truncate them. A *secure* section is another promise
(README, "Secure views": what the receiver reads can never change under it, even with a
hostile sender): it is a memfd the sender must write-seal, and F_SEAL_WRITE alone does not
stop ftruncate. A secure section without F_SEAL_SHRINK | F_SEAL_GROW can be shrunk and grown
back (its bytes read as zeros) or shrunk and left so (the reader dies of SIGBUS).
"""

from __future__ import annotations

import fcntl
import os

import pytest

from alpc.errors import ProtocolError
from alpc.protocol import Channel
from alpc.section import ConnectionSections
from alpc.security import PeerCred
from alpc.wire import Attributes, MessageType, SectionFlag, SectionNew, SectionRef, encode_attributes, encode_header

pytestmark = pytest.mark.timeout(30)

PEER = PeerCred(100, 1000, 1000)
MIB = 1 << 20
SIZE = 8192
SECURE_VIEW = int(SectionFlag.SECURE) | int(SectionFlag.VIEW)


def trusting_receiver() -> Channel:
    sections = ConnectionSections.build(inline_threshold=256, send_quota=64 * MIB, recv_quota=64 * MIB,
                                        max_length=64 * MIB, section_size=MIB, backend="memfd",
                                        allow_unsealed=True, secure=False)
    return Channel(PEER, send_limit=64 * MIB, recv_limit=64 * MIB, local_pid=2, sections=sections)


def write_sealed_only_memfd() -> int:
    """A hostile sender's 'secure' section: write-sealed, but its size is not."""
    fd = os.memfd_create("hostile-secure", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, b"S" * SIZE, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    return fd


def test_a_secure_section_not_sealed_against_resizing_is_refused_even_when_unsealed_ones_are_allowed() -> None:
    receiver = trusting_receiver()
    fd = write_sealed_only_memfd()
    try:
        attrs = encode_attributes(Attributes(ref=SectionRef(1, SECURE_VIEW, 0, SIZE),
                                             new=SectionNew(1, int(SectionFlag.SECURE), SIZE)))
        frame = encode_header(MessageType.DATAGRAM, 0, attr_length=len(attrs), n_fds=1) + attrs
        try:
            (message,) = receiver.receive(frame, [os.dup(fd)])
        except ProtocolError as exc:
            assert "shrinking and growing" in str(exc)
            return
        view = message.view
        assert view is not None and view.secure
        before = view.tobytes()
        # The sender shrinks and regrows it: a view the receiver was told is immutable changes.
        os.ftruncate(fd, 0)
        os.ftruncate(fd, SIZE)
        after = view.tobytes()
        view.release()
        assert after == before, "a secure view's bytes changed under the receiver"
    finally:
        os.close(fd)
        receiver.release_resources()

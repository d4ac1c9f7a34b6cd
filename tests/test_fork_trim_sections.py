"""A forked child's trim_sections() on a connection it inherited.

The child's copy of the section pool holds the parent's sections: retiring them sent the peer a
SECTION_CLOSE for sections the parent still writes, and the parent's next section body (a small
one goes straight into the known section) named a section the peer had unmapped: the peer
dropped the connection ("reference to unknown section 1"). The child is refused instead, as its
large sends are (SectionError naming the fork).
"""

from __future__ import annotations

import os

import pytest
from test_fork_close import in_child  # tests/ is on sys.path, as for tests/test_fork_inherited_sections.py

import alpc

pytestmark = pytest.mark.timeout(60)


def test_a_child_trimming_an_inherited_connection_is_refused_and_the_parents_sections_stay(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort]) -> None:
    server, client = local_pair
    payload = os.urandom(4096)
    client.send(payload, timeout=5)  # the section is announced: later small bodies go straight into it
    assert server.receive(timeout=5).data == payload

    def trim() -> None:
        with pytest.raises(alpc.SectionError, match="forked child"):
            client.trim_sections(timeout=5)

    assert in_child(trim) == 0
    client.send(payload[::-1], timeout=5)
    assert server.receive(timeout=5).data == payload[::-1]
    assert not server.closed and not client.closed
    client.trim_sections(timeout=5)  # the parent's own trim still works
    client.send(payload, timeout=5)
    assert server.receive(timeout=5).data == payload

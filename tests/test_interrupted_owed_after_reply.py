"""A reply whose frame went out whole, then a signal handler raised (Ctrl-C) while the write
that follows it waited for room for what another thread left owed meanwhile (see
test_interrupted_owed_after_send.py): the request was made owed again (reply_unsent), so the
application could answer it twice, and the client got a second reply for one request."""

from __future__ import annotations

import os

import pytest
from test_interrupted_owed_after_send import _interrupt_after_the_frame, _releases_reach

import alpc

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("size", [10, 4096])  # inline, and straight into the known section
def test_a_reply_whose_frame_left_is_not_owed_again_after_ctrl_c(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort], monkeypatch: pytest.MonkeyPatch,
        size: int) -> None:
    server, client = local_pair
    body = os.urandom(size)
    server.send(b"w" * 4096, timeout=5)  # the server's section is announced
    assert client.receive(timeout=5).data == b"w" * 4096
    pending = client.start_request(b"q", timeout=5)
    request = server.receive(timeout=5)
    _interrupt_after_the_frame(server, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        server.reply(request, body, timeout=5)
    monkeypatch.undo()
    assert pending.result(5).data == body
    with pytest.raises(ValueError, match="not a request awaiting a reply"):
        server.reply(request, b"twice", timeout=5)
    _releases_reach(client, server)
    _releases_reach(server, client)

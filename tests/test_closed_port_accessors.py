"""Accessors of a closed CommunicationPort must not hand out or use its released fd number.

``fileno()`` returned the socket's old number after close(): by then another file may have it
(a caller that polls or closes it acts on that file). ``reply_at_once()`` asked the kernel for
the room of that number's socket: False ("would wait") for a closed fd, and the room of
whatever file took the number otherwise, where ``reply()`` raises ConnectionClosed at once.
"""

from __future__ import annotations

import os
import socket

import pytest
from local_pairs import local_connection

import alpc

pytestmark = pytest.mark.timeout(60)


def test_fileno_of_a_closed_port_raises(broker: alpc.Broker, config: alpc.Config) -> None:
    with local_connection(config, "closed.port.fileno") as (_, server, client):
        number = client.fileno()
        client.close()
        # Another file takes the number, as any open() may.
        stranger, other = socket.socketpair()
        taken = False
        try:
            try:
                os.fstat(number)
            except OSError:
                os.dup2(stranger.fileno(), number)
                taken = True
            with pytest.raises(alpc.ConnectionClosed):
                client.fileno()
        finally:
            stranger.close()
            other.close()
            if taken:
                os.close(number)
        assert server.fileno() >= 0  # the open side still says its own


def test_reply_at_once_on_a_closed_port_raises_as_reply_does(broker: alpc.Broker, config: alpc.Config) -> None:
    with local_connection(config, "closed.port.at_once") as (_, server, client):
        pending = client.start_request(b"question", timeout=10)
        message = server.receive(timeout=10)
        server.close()
        with pytest.raises(alpc.ConnectionClosed):
            server.reply(message, b"answer")
        with pytest.raises(alpc.ConnectionClosed):
            server.reply_at_once(message, b"answer")
        del pending

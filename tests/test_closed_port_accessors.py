"""Accessors of a closed CommunicationPort must not hand out or use its released fd number.

``fileno()`` returned the socket's old number after close(): by then another file may have it
(a caller that polls or closes it acts on that file). It says -1 now, as a closed socket does,
so a selector the port was registered with still unregisters it. ``reply_at_once()`` asked the kernel for
the room of that number's socket: False ("would wait") for a closed fd, and the room of
whatever file took the number otherwise, where ``reply()`` raises ConnectionClosed at once.
"""

from __future__ import annotations

import os
import selectors
import socket

import pytest
from local_pairs import local_connection

import alpc

pytestmark = pytest.mark.timeout(60)


def test_fileno_of_a_closed_port_is_minus_one(broker: alpc.Broker, config: alpc.Config) -> None:
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
            assert client.fileno() == -1
        finally:
            stranger.close()
            other.close()
            if taken:
                os.close(number)
        assert server.fileno() >= 0  # the open side still says its own


def test_a_closed_port_leaves_the_selector_it_was_registered_with(broker: alpc.Broker,
                                                                  config: alpc.Config) -> None:
    with local_connection(config, "closed.port.selector") as (_, _server, client), \
            selectors.DefaultSelector() as selector:
        selector.register(client, selectors.EVENT_READ)
        client.close()
        selector.unregister(client)
        assert selector.get_map() == {}


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

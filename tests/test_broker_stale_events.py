"""The broker's loop against stale events: one select() batch is handled an event at a time,
and a handler may close fds whose events are still to come in that batch, their numbers then
taken by files opened later in it (a new server's pidfd). Such an event belonged to the old
file: it dropped a live port as its owner's death. The test failed before.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

import alpc
from alpc import control
from alpc.wire import MessageType
from tests.test_broker_faults import _one_frame, _raw, _send

pytestmark = pytest.mark.timeout(60)

def _create(name: str) -> control.CreatePort:
    return control.CreatePort(name=name, max_message_length=1024, max_connect_data=64, max_pending_connects=8)


def _port_names(query: socket.socket) -> list[str]:
    _send(query, control.ListPorts())
    frame = _one_frame(query)
    assert frame is not None and frame.type is MessageType.PORT_LIST, frame
    return [port.name for port in control.decode_body(frame.type, frame.data, control.PortList).ports]


class _LoopGate:
    """Holds the broker's loop in its status callback (between two selects), on request."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, _line: str) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(30)


# -- a stale event of a closed fd is taken for the death of the port owner now at that number ----------


def test_a_stale_event_cannot_drop_a_live_port_owner_whose_pidfd_took_a_freed_number(runtime_dir: Path) -> None:
    """broker.py serve_forever/_on_event: one select() batch is handled event by event, and an
    event is looked up by fd number (``fd in self._deaths`` before ``fd in self._peers``). A
    handler that closes fds (here: a client's CONNECT to port S whose owner just hung up, so the
    flush fails and _drop(S) closes S's socket and pidfd) frees numbers that a later handler of
    the same batch reuses: the next CREATE_PORT's _watch_death opens the owner's pidfd at the
    lowest free number, S's old socket number. S's own EOF event, later in the same batch, then
    reads as "the process behind that pidfd died" and the broker drops the healthy new port X:
    X's owner gets PORT_CREATED and then an EOF, and the name is gone. Any broker under load sees
    such batches (a server dies while a client connects to it and another server registers)."""
    gate = _LoopGate()
    config = alpc.Config.from_env(runtime_dir)
    fillers: list[int] = []
    socks: list[socket.socket] = []
    with alpc.Broker(runtime_dir, on_status=gate) as broker:
        try:
            owner_s = _raw(config)
            socks.append(owner_s)
            _send(owner_s, _create("svc.s"))
            created = _one_frame(owner_s)
            assert created is not None and created.type is MessageType.PORT_CREATED
            peer_s = broker._ports["svc.s"].owner
            highest = max(peer_s.stream.fileno(), peer_s.pidfd if peer_s.pidfd is not None else -1)
            # No free fd number below S's: the broker shares this process's fd table.
            while True:
                fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                if fd > highest:
                    os.close(fd)
                    break
                fillers.append(fd)
            client = _raw(config)
            owner_x = _raw(config)
            query = _raw(config)
            socks += [client, owner_x, query]
            assert _port_names(query) == ["svc.s"]  # accepted after client and owner_x: both are served
            gate.armed = True
            assert gate.entered.wait(10), "the broker's loop never reached its status callback"
            # While the loop waits between two selects, in this order: a connect to S, a new port
            # X, and S's owner hanging up.
            _send(client, control.Connect(name="svc.s", data=b"", max_message_length=1024, max_section_bytes=0))
            _send(owner_x, _create("svc.x"))
            owner_s.shutdown(socket.SHUT_RDWR)  # (not close: that would free a number in the broker's fd table)
            gate.release.set()
            answer = _one_frame(owner_x)
            assert answer is not None and answer.type is MessageType.PORT_CREATED
            names = _port_names(query)  # answered after the batch above
            assert "svc.x" in names, f"the live port svc.x was dropped by a stale event (ports: {names})"
        finally:
            gate.release.set()
            for sock in socks:
                sock.close()
            for fd in fillers:
                os.close(fd)

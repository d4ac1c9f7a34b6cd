"""A server's own request to a client connected with Quick-LPC rings.

The rings carry requests from the client to the server only; a request the server makes
goes by the socket. ``CommunicationPort.request`` took the ring path on the server side too:
the C call refused it (QLPC_E_ARGS, "a bug in the caller"), and the server dropped the
connection as a protocol error of the client's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import alpc
from alpc import _native

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))]

PEERS = Path(__file__).resolve().parent / "state_peers.py"


def test_a_server_request_over_a_quick_connection_goes_by_the_socket(
        broker: alpc.Broker, config: alpc.Config, runtime_dir: Path, spawn: Any) -> None:
    name = "svc.state.quickreq"
    start: Callable[..., Any] = spawn.argv
    with alpc.create_port(name, alpc.PortAttributes(quick_lpc=True), config=config) as port:
        peer = start([sys.executable, str(PEERS), "answering-client", name, "--runtime-dir", str(runtime_dir)])
        comm = port.listen(timeout=10).accept()
        assert peer.expect("READY")[1] == "True"  # the client took the rings
        assert comm.quick
        for word in ("one", "two"):
            peer.send("answer")
            assert comm.request(word.encode(), timeout=10).data == word.upper().encode()
            assert peer.expect("ANSWERED") == [word]
        peer.send("answer")
        assert comm.call(b"three", timeout=10) == b"THREE"
        peer.expect("ANSWERED")
        assert not comm.closed
        comm.close()

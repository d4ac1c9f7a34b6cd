"""`alpc stats` / `alpc peers` while a server answers over Quick-LPC rings with serve_requests()."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from test_introspection import eventually  # tests/ is on sys.path, as for other shared helpers

import alpc
from alpc import _native

PEERS = Path(__file__).resolve().parent / "stats_client_peers.py"
native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
pytestmark = [pytest.mark.timeout(60), native]


def test_ring_traffic_is_reported_while_serve_requests_runs(broker: alpc.Broker, config: alpc.Config,
                                                            runtime_dir: Path, spawn) -> None:
    """serve_requests() answers ring requests in C and folded their counts into the port's
    figures only when it returned: a server serving for minutes showed no traffic at all."""
    attributes = alpc.PortAttributes(quick_lpc=True)
    with alpc.create_port("svc.qserve", attributes, config=config, report_interval=0.05) as port:
        client = spawn.argv([sys.executable, str(PEERS), "svc.qserve", "--runtime-dir", str(runtime_dir)])
        comm = port.listen(timeout=10).accept()
        assert client.expect("READY")[1] == "1"  # the client took the rings
        returned: list[alpc.Message] = []
        server = threading.Thread(target=lambda: returned.append(comm.serve_requests(bytes.upper, timeout=30)))
        server.start()
        try:
            client.send("call 5")
            client.expect("CALLED")

            def peer() -> alpc.control.PeerReport | None:
                listing = alpc.list_peers("svc.qserve", config)
                return listing.peers[0] if listing.peers else None

            seen = eventually(peer, lambda p: p is not None and p.messages_in == 5)
            assert seen is not None and (seen.messages_in, seen.bytes_in, seen.messages_out, seen.bytes_out) == \
                (5, 15, 5, 15)
            totals = alpc.port_stats("svc.qserve", config).ports[0].counters
            assert (totals.messages_in, totals.messages_out) == (5, 5)
        finally:
            client.send("send stop")  # ends serve_requests(): it returns the datagram
            client.expect("SENT")
            server.join(30)
        assert not server.is_alive() and returned[0].data == b"stop"
        client.send("close")
        client.expect("CLOSED")
        comm.close()
        # Folded once, not twice: the figures after serve_requests() returned are the same.
        totals = eventually(lambda: alpc.port_stats("svc.qserve", config).ports[0].counters,
                            lambda c: c.disconnects == 1)
        assert (totals.messages_in, totals.bytes_in, totals.messages_out, totals.bytes_out) == (6, 19, 5, 15)

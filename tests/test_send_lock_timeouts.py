"""A call's timeout bounds its wait for the connection's writer lock too.

One thread's send blocked on a full socket (a peer that stopped reading) holds the port's
send lock for up to its own, long timeout; another thread's ``send(timeout=0.2)``,
``request(timeout=0.2)``, ``flush(timeout=0.2)`` or ``cancel(id, timeout=0.2)`` must still
return about when its own timeout runs out (``Timeout``; ``cancel`` gives up the CANCEL's
write as it does when the write itself times out), not when the other thread's does.

The peer is tests/signal_peers.py's ``server``: it accepts and then reads nothing until told.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from local_pairs import fill_socket
from test_qlpc_faults import until  # tests/ is on sys.path, as for tests/test_rpc_e2e.py

import alpc

PEERS = Path(__file__).resolve().parent / "signal_peers.py"
pytestmark = pytest.mark.timeout(60)

# The blocked sender's timeout, and how long the other thread's call may take with its own 0.2 s.
_HOLDER_TIMEOUT = 6.0
_SHORT = 0.2
_MARGIN = 1.5


@pytest.fixture
def server(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(name: str):  # type: ignore[no-untyped-def]
        process = spawn.argv([sys.executable, str(PEERS), "server", name, "--runtime-dir", str(runtime_dir)])
        process.expect("READY")
        return process
    return start


def _operations(comm: alpc.CommunicationPort, request_id: int) -> dict[str, Callable[[], object]]:
    return {
        "send": lambda: comm.send(b"x", timeout=_SHORT),
        "request": lambda: comm.request(b"q", timeout=_SHORT),
        "flush": lambda: comm.flush(timeout=_SHORT),
        "cancel": lambda: comm.cancel(request_id, timeout=_SHORT),
    }


@pytest.mark.parametrize("operation", ["send", "request", "flush", "cancel"])
def test_a_call_behind_a_blocked_sender_keeps_its_own_timeout(broker, config, server, operation) -> None:  # type: ignore[no-untyped-def]
    peer = server(f"wait.lock.{operation}")
    with alpc.connect(f"wait.lock.{operation}", config=config, timeout=10) as comm:
        peer.expect("ACCEPTED")
        pending = comm.start_request(b"in flight", timeout=5)  # for cancel(); it sits in the socket
        sent = fill_socket(comm, 16384, 0.05)
        flow = comm._core.channel.flow
        taken = flow.datagrams_out
        outcome: list[BaseException | None] = []  # the holder's: any end once the peer reads

        def hold() -> None:
            try:
                comm.send(b"h" * 16384, timeout=_HOLDER_TIMEOUT)
                outcome.append(None)
            except BaseException as exc:  # reported to the test thread
                outcome.append(exc)

        holder = threading.Thread(target=hold)
        holder.start()
        until(lambda: flow.datagrams_out > taken)  # the holder framed its datagram: it holds the lock
        if operation == "flush":
            comm.send(b"queued", flush=False)  # something for flush() to write (queued, not written)
        call = _operations(comm, pending.id)[operation]
        started = time.monotonic()
        try:
            if operation == "cancel":
                assert call() is True
            else:
                with pytest.raises(alpc.Timeout):
                    call()
        finally:
            took = time.monotonic() - started
            held = holder.is_alive()  # still blocked in its send: the lock was taken throughout
            peer.send("read")  # let the holder finish
            holder.join(_HOLDER_TIMEOUT + 5)
        assert took < _SHORT + _MARGIN, f"{operation}(timeout={_SHORT}) took {took:.2f} s behind another send"
        assert held and sent > 0
        assert outcome, "the holder's send never returned"
        del pending

"""The port-wide section budget (max_port_section_bytes) across drivers: idle pooled sections
of a connection served by the asyncio driver are given back too, a sender of either driver
asks for them, a reply the budget throttled says so, and the give-back never waits for a
client that stopped reading (real server processes from tests/budget_fault_peers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "budget_fault_peers.py"
MIB = 1 << 20

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def peer(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(drivers: str, name: str, *args: str):  # type: ignore[no-untyped-def]
        server = spawn.argv([sys.executable, str(PEERS), drivers, name, "--runtime-dir", str(runtime_dir), *args])
        server.expect("READY")
        return server
    return start


@pytest.mark.parametrize("drivers", ["aa", "ab", "ba"])
def test_an_idle_pool_does_not_starve_another_connection_whatever_its_driver(  # type: ignore[no-untyped-def]
        broker, config, peer, drivers: str) -> None:
    """A budget of one section: the first client's large reply leaves a pooled section
    behind, idle once released. The second client's large reply must get the space, when
    either connection is served by the asyncio driver: before, only connections of the
    blocking driver were asked for their idle sections (and only by a blocking sender), so
    the reply waited out its timeout (THROTTLED) and the client lost its answer."""
    server = peer(drivers, f"budget.{drivers}")
    with alpc.connect(f"budget.{drivers}", config=config, timeout=10) as first, \
            alpc.connect(f"budget.{drivers}", config=config, timeout=10) as second:
        server.expect("ACCEPTED")
        assert len(first.request(b"big", timeout=10).data) == 3 * MIB  # copied out: released
        assert first.request(b"sync", timeout=10).data == b"ok"  # the release was read by now
        answer = second.request(b"big", timeout=10).data
        assert len(answer) == 3 * MIB, f"starved by the first connection's idle section: {answer[:20]!r}"
        assert first.request(b"sync", timeout=10).data == b"ok"  # the first still works
        assert len(first.request(b"big", timeout=10).data) == 3 * MIB


@pytest.mark.parametrize("drivers", ["bb", "aa"])
def test_a_reply_throttled_by_the_port_budget_says_so(broker, config, peer, drivers: str) -> None:  # type: ignore[no-untyped-def]
    """The first client holds its large reply unread (its range stays lent: nothing to give
    back), so the second client's large reply waits for the port's budget until its timeout.
    That client read everything: the Throttled and the CLIENT_DIED notice said "the client
    stopped reading its replies", which sends an operator after the wrong side. They must
    name the port's section budget; and both drivers drop the client alike (the asyncio one
    said the connection was dropped, and kept it with its request unanswered)."""
    server = peer(drivers, f"budget.why.{drivers}", "--reply-timeout", "0.5")
    with alpc.connect(f"budget.why.{drivers}", config=config, timeout=10) as first, \
            alpc.connect(f"budget.why.{drivers}", config=config, timeout=10) as second:
        server.expect("ACCEPTED")
        held = first.request(b"big", timeout=10)  # never copied out: its range stays lent
        with pytest.raises(alpc.ConnectionClosed):
            second.request(b"big", timeout=10)  # the server drops it
        index, limit, *words = server.expect("THROTTLED")
        message = " ".join(words)
        assert (index, limit) == ("1", "max_port_section_bytes"), message
        assert "max_port_section_bytes" in message and "stopped reading" not in message, message
        index, *words = server.expect("NOTICE")
        reason = " ".join(words)
        assert index == "1"
        assert "max_port_section_bytes" in reason and "stopped reading" not in reason, reason
        assert len(held.data) == 3 * MIB
        assert first.request(b"sync", timeout=10).data == b"ok"  # the first is untouched


def test_giving_back_never_waits_for_a_client_that_stopped_reading(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """Three clients each leave an idle pooled section, then stop reading (the server's socket
    to each is full). A fourth client's large reply, with a 0.3 s timeout, needs one of those
    sections back: trimming frees the budget at once, but the give-back then wrote each
    SECTION_CLOSE with a 1 s timeout of its own, so the reply took 3 s, ten times its
    timeout. It must leave the SECTION_CLOSE owed (it goes with that connection's next
    write) and go on."""
    server = peer("bbbb", "budget.stuck", "--budget-mib", "12", "--reply-timeout", "0.3")
    clients = [alpc.connect("budget.stuck", config=config, timeout=10) for _ in range(4)]
    try:
        server.expect("ACCEPTED")
        *stuck, asker = clients
        for index, comm in enumerate(stuck):
            assert len(comm.request(b"big", timeout=10).data) == 3 * MIB
            assert comm.request(b"sync", timeout=10).data == b"ok"
            comm.send(b"fill", timeout=10)
            assert server.expect("FULL") == [str(index), "open"]
        assert len(asker.request(b"big", timeout=10).data) == 3 * MIB
        index, took = server.expect("REPLIED")
        assert index == "3"
        assert float(took) < 1.0, f"a reply with a 0.3 s timeout took {took} s (waiting for clients not reading)"
    finally:
        for comm in clients:
            comm.close()

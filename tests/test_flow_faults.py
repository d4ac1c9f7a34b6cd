"""Flow control and the request lifecycle of the blocking driver at their edges (real server processes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import alpc

PEERS = Path(__file__).resolve().parent / "flow_fault_peers.py"


@pytest.fixture
def peer(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(role: str, name: str, *args: str):  # type: ignore[no-untyped-def]
        server = spawn.argv([sys.executable, str(PEERS), role, name, "--runtime-dir", str(runtime_dir), *args])
        server.expect("READY")
        return server
    return start


@pytest.mark.timeout(30)
def test_close_writes_the_datagrams_queued_with_flush_false(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """README: a flush=False datagram "goes out with the next write on the port"; close()'s
    PORT_CLOSED is such a write, and the datagrams were accepted (their window slots taken)."""
    server = peer("log", "edge.close")
    comm = alpc.connect("edge.close", config=config, timeout=10)
    comm.send(b"d1", flush=False)
    comm.send(b"d2", flush=False)
    comm.close()
    assert server.expect("MSG") == ["DGRAM", "d1"]
    assert server.expect("MSG") == ["DGRAM", "d2"]
    assert server.expect("MSG") == ["PORT_CLOSED"]


@pytest.mark.timeout(30)
def test_a_quick_lpc_request_goes_after_the_datagrams_queued_before_it(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """README: queued datagrams go out with the next write, "any send, request or reply"; order is kept."""
    server = peer("log", "edge.quick", "--quick")
    with alpc.connect("edge.quick", config=config, timeout=10) as comm:
        if not comm.quick:
            pytest.skip("Quick-LPC rings are not available here")
        comm.send(b"d1", flush=False)
        assert comm.request(b"r1", timeout=10).data == b"R1"
        comm.flush(timeout=10)
        assert server.expect("MSG") == ["DGRAM", "d1"]
        assert server.expect("MSG") == ["REQ", "r1"]


@pytest.mark.timeout(40)
def test_a_reply_whose_write_timed_out_with_nothing_sent_can_be_sent_again(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """A client answering its server's (callback) request: the write times out before a byte
    left (the server is not reading). The client still holds the request, so it must be able to
    answer it once the server reads again; otherwise the server waits in vain and its request
    keeps a slot of the window for good."""
    server = peer("callback", "edge.reply")
    with alpc.connect("edge.reply", config=config, timeout=10) as comm:
        server.expect("SENT")
        message = comm.receive(timeout=10)
        assert message.type is alpc.MessageType.REQUEST and message.data == b"cb"
        # Fill the socket: small datagrams until one cannot be written at all (the server reads nothing now).
        with pytest.raises(alpc.Timeout) as filled:
            for _ in range(20000):
                comm.send(b"x" * 200, timeout=0.2)
        assert not isinstance(filled.value, alpc.Throttled), "the datagram window closed before the socket filled"
        with pytest.raises(alpc.Timeout):
            message.reply(b"ans", timeout=0.2)
        assert not comm.closed
        server.send("go")  # the server reads again
        message.reply(b"ans", timeout=10)
        assert server.expect("RESULT") == ["ans"]
        server.send("done")


# -- sans-IO: ids that come round again ---------------------------------------------------

def _core(is_server: bool):  # type: ignore[no-untyped-def]
    from alpc.connection import Connection
    from alpc.protocol import Channel
    from alpc.section import ConnectionSections
    from alpc.security import PeerCred

    mib = 1 << 20
    sections = ConnectionSections.build(inline_threshold=256, send_quota=64 * mib, recv_quota=64 * mib,
                                        max_length=64 * mib, section_size=mib, backend="memfd",
                                        allow_unsealed=False, secure=False)
    channel = Channel(PeerCred(100, 1000, 1000), send_limit=64 * mib, recv_limit=64 * mib, local_pid=1,
                      sections=sections)
    return Connection(channel, is_server=is_server)


def _deliver(frames, to):  # type: ignore[no-untyped-def]
    batch = to.receive(b"".join(frames), [])
    out = to.outgoing(batch)
    return to.route(batch), out


@pytest.mark.timeout(10)
def test_a_cancel_nobody_waited_on_does_not_cancel_a_later_request_with_the_same_id() -> None:
    """PendingRequest.cancel() with nobody in result() (the documented "cancel from any thread"):
    the id stays marked cancelled. Once the late reply came, the id is free, and when the 30-bit
    ids come round (2**30 sends later, fast-forwarded here) the new request with that id is
    reported Cancelled at once, though nobody cancelled it."""
    client, server = _core(False), _core(True)
    try:
        first, frames = client.request(b"work")
        _deliver(frames, server)
        wake, (out, _) = _deliver(client.cancel(first), server)
        assert wake.cancelled and server.take_cancelled()
        _deliver(out, client)  # the runtime's CANCELLED reply: dropped, and the id is free again
        client.channel._next_id = first  # the ids wrapped round (2**30 sends later)
        second, frames = client.request(b"next")
        assert second == first
        # Nothing has answered or cancelled the new request yet.
        assert client.take_reply(second) is None
        _deliver(frames, server)
        request = server.take_message()
        assert request is not None and request.data == b"next"
        _deliver(server.reply(request, b"NEXT"), client)
        assert client.take_reply(second).data == b"NEXT"
    finally:
        client.release_resources()
        server.release_resources()


@pytest.mark.timeout(30)
def test_a_pending_request_dropped_unread_leaves_no_reply_behind(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """start_request() whose PendingRequest is dropped without result(): its reply must not sit
    in the port's reply table for the connection's life (one entry per such request)."""
    server = peer("log", "edge.dropped")
    with alpc.connect("edge.dropped", config=config, timeout=10) as comm:
        pending = comm.start_request(b"r1", timeout=10)
        dropped = pending.id
        del pending
        assert server.expect("MSG") == ["REQ", "r1"]
        # R1 comes before R2 on the stream: this read passes it.
        assert comm.request(b"r2", timeout=10).data == b"R2"
        assert dropped not in comm._core.replies

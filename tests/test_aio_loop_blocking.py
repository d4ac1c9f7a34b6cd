"""What alpc's asyncio code runs on the event loop thread: nothing that waits on a peer.

Each test has a peer that does not read until the loop has shown it is free while the
operation is in flight (a threading.Event set by a loop callback or by another loop task):
on a loop the operation blocks, that event is never set in time, the peer never reads, and
the operation ends in its timeout instead of succeeding. No timing is asserted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading

import pytest

import alpc
from alpc import aio, control
from alpc.completion import CompletionPort
from alpc.config import MAX_CONNECT_DATA
from alpc.exchange import control_frame
from alpc.security import kinds_mask

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024
ACCEPT_DATA = 384 * 1024  # more than a fresh socket's send buffer (net.core.wmem_default, 208 KiB)


def _raw_connect(config: alpc.Config, name: str) -> socket.socket:
    """A client's CONNECT to the broker, written by hand so that it can hold off reading the reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(config.broker_socket))
    body = control.Connect(name=name, data=b"", max_message_length=config.max_message_length,
                           max_section_bytes=config.max_section_bytes,
                           flow=control.FlowSpec.of(config.flow_limits(), kinds_mask(config.handle_kinds)))
    sock.sendall(b"".join(control_frame(body)))
    return sock


def _read_all(sock: socket.socket, at_least: int) -> int:
    got = 0
    sock.settimeout(10)
    while got < at_least:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    return got


def test_accept_with_large_accept_data_leaves_the_loop_free(broker, config) -> None:  # type: ignore[no-untyped-def]
    """AsyncConnectionRequest.accept() wrote the connection reply from the loop thread with a
    blocking send: accept data larger than the socket's buffer, to a client that reads only
    later, froze every task of the loop for up to the accept's timeout."""
    server_config = dataclasses.replace(config, max_connect_data=MAX_CONNECT_DATA)
    loop_free = threading.Event()
    received: list[int] = []

    def client(sock: socket.socket) -> None:
        if loop_free.wait(10):
            received.append(_read_all(sock, ACCEPT_DATA))
        sock.close()

    async def main() -> str:
        port = await aio.create_port("zz.accept.big", config=server_config, timeout=10)
        sock = _raw_connect(config, "zz.accept.big")
        reader = threading.Thread(target=client, args=(sock,))
        reader.start()
        try:
            request = await port.listen(timeout=10)
            accepting = asyncio.create_task(request.accept(b"x" * ACCEPT_DATA, timeout=3))
            await asyncio.sleep(0)  # handshake-free: one loop turn (FIFO), the accept task takes its first step
            loop_free.set()  # reached while it is in flight only if that step did not block the loop
            try:
                comm = await accepting
            except alpc.PeerGone:
                return "the accept blocked the loop until its timeout"
            await comm.close()
            return "accepted"
        finally:
            loop_free.set()
            await asyncio.get_running_loop().run_in_executor(None, reader.join, 10)
            await port.close()

    assert asyncio.run(main()) == "accepted"
    assert received and received[0] >= ACCEPT_DATA


# -- the completion port's async handlers ---------------------------------------------------

SECTION = 128 * 1024
BIG = 80 * 1024  # two never fit in one SECTION-byte budget; past EAGER_COPY_MAX, so a body waits to be read


def test_completion_async_reply_does_not_stall_other_handlers(broker, config) -> None:  # type: ignore[no-untyped-def]
    """CompletionPort wrote an async handler's reply (the blocking port's reply) on its
    private loop: a reply waiting for section space (its client still holds the previous
    reply's body) stopped every other client's handler until it went out or send_timeout."""
    attributes = alpc.PortAttributes(section_size=SECTION, max_section_bytes=SECTION, send_timeout=30.0)
    name = "zz.completion.reply"
    answering = threading.Event()
    bigs = 0

    async def handler(message: alpc.Message) -> bytes:
        nonlocal bigs
        if message.data != b"big":
            return b"pong"
        bigs += 1
        if bigs == 2:
            answering.set()  # its reply is written right after this returns, and waits for space
        return b"r" * BIG

    with alpc.create_port(name, attributes, config=config, timeout=10) as port:
        completion = CompletionPort(port, handler)
        serving = threading.Thread(target=completion.serve)
        serving.start()
        holder = alpc.connect(name, config=config, timeout=10)
        other = alpc.connect(name, config=config, timeout=10)
        waiting: list[alpc.Message] = []
        second = threading.Thread(target=lambda: waiting.append(holder.request(b"big", timeout=30)))
        try:
            first = holder.request(b"big", timeout=10)  # its body holds 40 KiB of the 64 KiB section
            second.start()
            assert answering.wait(10)
            try:
                outcome = other.request(b"ping", timeout=3).data.decode()
            except alpc.Timeout:
                outcome = "the other client's handler stalled behind the blocked reply"
            assert not waiting, "the second reply should still wait for the space the first holds"
            assert first.size == BIG
            del first  # the space comes back: the second reply goes out
            second.join(30)
            assert waiting and waiting[0].size == BIG
        finally:
            completion.stop()
            serving.join(10)
            holder.close()
            other.close()
            waiting.clear()  # its body maps the server's section
    assert outcome == "pong"


def test_a_reply_that_could_wait_is_not_written_at_once(broker, config) -> None:  # type: ignore[no-untyped-def]
    """reply_at_once(), how a completion port's async handler answers on its loop, writes only
    what cannot wait: an inline body with room for it (and all that may be owed before it) in
    the socket. Otherwise it writes nothing and says so; the reply then goes the usual way."""
    with alpc.create_port("loop.atonce", config=config) as port:
        accepted: list[alpc.CommunicationPort] = []
        accepter = threading.Thread(target=lambda: accepted.append(port.listen(timeout=10).accept()))
        accepter.start()
        with alpc.connect("loop.atonce", config=config, timeout=10) as client:
            accepter.join(10)
            (server,) = accepted
            first, second = client.start_request(b"one"), client.start_request(b"two")
            requests = [server.receive(timeout=10), server.receive(timeout=10)]
            sock = server._stream._sock  # type: ignore[attr-defined]
            roomy = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            assert not server.reply_at_once(requests[0], b"ONE")  # a small buffer: it could wait
            assert client._stream.unread() == 0  # type: ignore[attr-defined]  # nothing was written
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, roomy)
            assert not server.reply_at_once(requests[0], b"O" * (MIB // 2))  # a section body could wait
            assert server.reply_at_once(requests[0], b"ONE")
            assert first.result(timeout=10).data == b"ONE"
            server.reply(requests[1], b"TWO")
            assert second.result(timeout=10).data == b"TWO"
            server.close()

"""Large messages end to end with real processes: the automatic section path, views,
secure views, backpressure, memory grants, both backends, and dying peers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import alpc
from alpc.section import shm_prefix

SECTION_PEERS = Path(__file__).resolve().parent / "section_peers.py"
ROOT = Path(__file__).resolve().parent.parent
KIB = 1 << 10
MIB = 1 << 20
PATTERN = bytes(range(256))


def pattern(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def sha(data: object) -> str:
    return hashlib.sha256(data).hexdigest()  # type: ignore[arg-type]


@pytest.fixture
def section_server(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    """section_server(name, *options) starts tests/section_peers.py's server and waits for READY."""
    def start(name: str, *options: str):  # type: ignore[no-untyped-def]
        peer = spawn.argv([sys.executable, str(SECTION_PEERS), "server", name,
                           "--runtime-dir", str(runtime_dir), *options])
        peer.expect("READY")
        return peer
    return start


def memfds() -> int:
    return sum(1 for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}") and "memfd:" in _target(fd))


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# -- the automatic path -------------------------------------------------------------------


@pytest.mark.parametrize("size", [257, 64 * KIB, MIB, 16 * MIB])
def test_large_bodies_go_through_sections_both_ways(broker, config, section_server, size: int) -> None:  # type: ignore[no-untyped-def]
    server = section_server("svc.large")
    payload = os.urandom(size)
    with alpc.connect("svc.large", config=config, timeout=5) as comm:
        assert comm.request(payload, timeout=30).data == f"sha:{sha(payload)}:{size}".encode()
        assert comm.request(f"cmd:big:{size}".encode(), timeout=30).data == pattern(size)
        assert comm.request(f"cmd:push:{size}".encode(), timeout=30).data == b"pushed"
        pushed = comm.receive(timeout=30)
        assert pushed.type is alpc.MessageType.DATAGRAM and pushed.data == pattern(size) and pushed.view is None
        comm.send(memoryview(payload))
        assert server.expect("DATAGRAM") == [str(size), sha(payload)]


def test_the_pool_is_reused_in_steady_state(broker, config, section_server) -> None:  # type: ignore[no-untyped-def]
    section_server("svc.steady")
    with alpc.connect("svc.steady", config=config, timeout=5) as comm:
        payload = os.urandom(100 * KIB)
        comm.request(payload, timeout=10)
        pool = comm._channel.sections.pool  # type: ignore[union-attr]
        sections, fds = pool.ledger.section_ids, memfds()
        for _ in range(100):
            assert comm.request(payload, timeout=10).data.startswith(b"sha:")
            comm.send(payload)
        assert pool.ledger.section_ids == sections and memfds() == fds
        # A small request answered after the last datagram was taken (and its body copied out,
        # which sends the release): all ranges are back. A ping would not do: its PONG is the
        # runtime's answer at read time, before the application takes the datagram.
        assert comm.request(b"sync", timeout=10).data.startswith(b"sha:")
        assert pool.ledger.lent_bytes() == 0
        comm.trim_sections()  # idle sections unmapped on both sides
        assert pool.ledger.section_ids == [] and memfds() < fds
        assert comm.request(payload, timeout=10).data.startswith(b"sha:")


def test_small_bodies_copied_straight_into_the_section_survive_a_write_that_sent_nothing(  # type: ignore[no-untyped-def]
        broker, config, section_server, monkeypatch) -> None:
    """Once the peer maps a section, a small body is copied into it with no view on the way:
    a write that fails before a byte left gives the range, the window slot and the request
    back, and the connection goes on (every kind: request, datagram, and a reply to the peer)."""
    server = section_server("svc.copied")
    payload = os.urandom(4 * KIB)
    with alpc.connect("svc.copied", config=config, timeout=5) as comm:
        assert comm.request(payload, timeout=10).data == f"sha:{sha(payload)}:{len(payload)}".encode()
        pool = comm._channel.sections.pool  # type: ignore[union-attr]
        assert comm.request(b"sync", timeout=10).data.startswith(b"sha:")
        assert pool.ledger.lent_bytes() == 0
        flow = comm._core.channel.flow
        send = comm._stream.send
        placed: list[int] = []

        def refuse(*args: object, **kwargs: object) -> None:
            placed.append(pool.ledger.lent_bytes())  # the body is in the section by now
            raise alpc.Timeout("refused by the test before a byte left")

        monkeypatch.setattr(comm._stream, "send", refuse)
        with pytest.raises(alpc.Timeout):
            comm.request(payload, timeout=5)
        with pytest.raises(alpc.Timeout):
            comm.send(payload, timeout=5)
        monkeypatch.setattr(comm._stream, "send", send)
        assert placed == [len(payload), len(payload)]
        assert pool.ledger.lent_bytes() == 0 and flow.datagrams_out == 0 and not comm._channel._pending
        assert comm.request(payload, timeout=10).data == f"sha:{sha(payload)}:{len(payload)}".encode()
        comm.send(payload, timeout=10)
        assert server.expect("DATAGRAM") == [str(len(payload)), sha(payload)]


def test_a_message_of_max_message_length_works(broker, config, section_server) -> None:  # type: ignore[no-untyped-def]
    size = alpc.PortAttributes().max_message_length  # 1 GiB by default
    section_server("svc.huge")
    with alpc.connect("svc.huge", config=config, timeout=5) as comm:
        view = comm.create_view(size, timeout=60)  # filled in place: no second 1 GiB copy here
        view.memory[:MIB] = pattern(MIB)
        view.memory[size - MIB:] = pattern(MIB)
        reply = comm.request(view, timeout=120)
        expected = hashlib.sha256()
        expected.update(pattern(MIB))
        zeros = bytes(MIB)
        for _ in range(size // MIB - 2):
            expected.update(zeros)
        expected.update(pattern(MIB))
        assert reply.data == f"view:{expected.hexdigest()}:{size}:writable=False:secure=False".encode()
        with pytest.raises(alpc.MessageTooLarge):
            comm.create_view(size + 1)


# -- views ------------------------------------------------------------------------------------


def test_views_travel_with_no_copy_and_arrive_read_only(broker, config, section_server) -> None:  # type: ignore[no-untyped-def]
    section_server("svc.views")
    with alpc.connect("svc.views", config=config, timeout=5) as comm:
        for size in (100, 3 * MIB):  # a view goes through its section whatever its size
            with comm.create_view(size, timeout=5) as memory:
                memory[:] = pattern(size)
            view = comm.create_view(size, timeout=5)
            view.memory[:] = pattern(size)
            reply = comm.request(view, timeout=10)
            assert view.released  # handed over: the sender cannot touch it any more
            assert reply.data == f"view:{sha(pattern(size))}:{size}:writable=False:secure=False".encode()
        reply = comm.request(b"cmd:view:" + str(2 * MIB).encode(), timeout=10)
        assert reply.view is not None and reply.view.readonly
        with reply.view as memory:
            assert bytes(memory[:256]) == PATTERN
            with pytest.raises(TypeError):
                memory[0] = 1
        assert reply.view.released
        with pytest.raises(alpc.SectionError, match="released"):
            reply.data  # noqa: B018 - the body was only ever in the view
        other = comm.request(b"cmd:view:1000", timeout=10)
        assert other.data == pattern(1000)  # one call copies out
        other.view.release()  # type: ignore[union-attr]
        assert comm._channel.sections.pool.ledger.lent_bytes() == 0  # type: ignore[union-attr]


def test_released_space_is_reused_by_the_sender(broker, config, section_server) -> None:  # type: ignore[no-untyped-def]
    section_server("svc.reuse", "--max-section-bytes", str(4 * MIB), "--section-size", str(4 * MIB))
    with alpc.connect("svc.reuse", config=config, timeout=5) as comm:
        for _ in range(20):  # 20 x 3 MiB through a 4 MiB quota: only works if releases come back
            reply = comm.request(b"cmd:view:" + str(3 * MIB).encode(), timeout=10)
            with reply.view as memory:  # type: ignore[union-attr]
                assert len(memory) == 3 * MIB


def test_a_full_pool_waits_for_releases_then_proceeds(broker, runtime_dir, section_server) -> None:  # type: ignore[no-untyped-def]
    server = section_server("svc.pressure", "--hold-views")
    config = alpc.Config(runtime_dir=runtime_dir, max_section_bytes=8 * MIB, section_size=4 * MIB)
    with alpc.connect("svc.pressure", config=config, timeout=5) as comm:
        for held in (1, 2):
            view = comm.create_view(3 * MIB, timeout=5)
            assert comm.request(view, timeout=10).data.startswith(b"view:")
            assert server.expect("HOLDING") == [str(held)]
        with pytest.raises(alpc.Timeout):
            comm.create_view(3 * MIB, timeout=0.3)
        with pytest.raises(alpc.Timeout):  # the automatic path waits too instead of failing at once
            comm.request(os.urandom(3 * MIB), timeout=0.3)
        with pytest.raises(alpc.MessageTooLarge, match="quota"):
            comm.request(bytes(9 * MIB), timeout=1)
        result: list[alpc.Message] = []
        waiter = threading.Thread(target=lambda: result.append(comm.request(pattern(3 * MIB), timeout=20)))
        waiter.start()
        server.send("release")
        server.expect("RELEASED")
        waiter.join(20)
        assert result and result[0].data == f"sha:{sha(pattern(3 * MIB))}:{3 * MIB}".encode()


def test_secure_views_per_message_and_per_port(broker, config, section_server) -> None:  # type: ignore[no-untyped-def]
    section_server("svc.secure")
    with alpc.connect("svc.secure", config=config, timeout=5) as comm:
        view = comm.create_view(MIB, secure=True, timeout=5)
        view.memory[:] = pattern(MIB)
        assert comm.request(view, timeout=10).data.endswith(b":writable=False:secure=True")
        plain = comm.create_view(MIB, timeout=5)
        assert comm.request(plain, timeout=10).data.endswith(b":secure=False")
        assert comm.request(b"cmd:secure:" + str(MIB).encode(), timeout=10).data == pattern(MIB)
        assert comm.request(os.urandom(MIB), secure=True, timeout=10).data.startswith(b"sha:")
    section_server("svc.allsecure", "--secure-views")
    with alpc.connect("svc.allsecure", config=config, timeout=5) as comm:
        plain = comm.create_view(MIB, timeout=5)  # the port makes every view secure
        assert plain.secure
        assert comm.request(plain, timeout=10).data.endswith(b":secure=True")
        reply = comm.request(b"cmd:view:" + str(MIB).encode(), timeout=10)
        assert reply.view is not None and reply.view.secure
        reply.view.release()


def test_views_still_held_when_the_connection_ends_stay_valid(broker, config, section_server) -> None:  # type: ignore[no-untyped-def]
    server = section_server("svc.gone")
    comm = alpc.connect("svc.gone", config=config, timeout=5)
    reply = comm.request(b"cmd:view:" + str(MIB).encode(), timeout=10)
    kept = comm.request(b"cmd:big:" + str(MIB).encode(), timeout=10)
    server.kill()
    with pytest.raises(alpc.PeerGone):
        comm.request(b"x", timeout=5)
    comm.close()
    view = reply.view
    assert view is not None and bytes(view.memory[:256]) == PATTERN  # the mapping outlived everything
    view.release()
    assert kept.data == pattern(MIB)


def test_posix_backend_end_to_end(broker, runtime_dir, section_server) -> None:  # type: ignore[no-untyped-def]
    section_server("svc.posix", "--section-backend", "posix", "--allow-unsealed")
    config = alpc.Config(runtime_dir=runtime_dir, section_backend="posix", allow_unsealed_sections=True)
    with alpc.connect("svc.posix", config=config, timeout=5) as comm:
        payload = os.urandom(5 * MIB)
        assert comm.request(payload, timeout=10).data == f"sha:{sha(payload)}:{len(payload)}".encode()
        assert comm.request(b"cmd:big:" + str(MIB).encode(), timeout=10).data == pattern(MIB)
        view = comm.create_view(MIB, timeout=5)
        view.memory[:] = pattern(MIB)
        assert comm.request(view, timeout=10).data.startswith(f"view:{sha(pattern(MIB))}".encode())
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(shm_prefix())]


def test_unsealed_sections_are_refused_unless_trusted(broker, runtime_dir, section_server) -> None:  # type: ignore[no-untyped-def]
    server = section_server("svc.sealed-only")
    config = alpc.Config(runtime_dir=runtime_dir, section_backend="posix")
    with alpc.connect("svc.sealed-only", config=config, timeout=5) as comm:
        with pytest.raises(alpc.PeerGone):
            comm.request(os.urandom(MIB), timeout=10)
    assert "not_sealed" in " ".join(server.expect("CLIENT_DIED"))


# -- memory grants -------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False])
def test_grants_read_and_write_client_memory(broker, config, section_server, direct: bool) -> None:  # type: ignore[no-untyped-def]
    section_server("svc.grant", *([] if direct else ["--no-direct-memory"]))
    with alpc.connect("svc.grant", config=config, timeout=5) as comm:
        for size in (100, 3 * MIB):
            source = os.urandom(size)
            reply = comm.request(b"cmd:grant-read", grant=alpc.MemoryGrant(source), timeout=10)
            assert reply.data == f"sha:{sha(source)}:{size}:direct={direct}".encode()
            target = bytearray(size + 10)
            reply = comm.request(f"cmd:grant-write:{size}".encode(), timeout=10,
                                 grant=alpc.MemoryGrant(target, read=False, write=True))
            assert reply.data == f"wrote:direct={direct}".encode()
            assert target[:size] == pattern(size) and target[size:] == bytes(10)


def test_grants_outside_their_bounds_are_refused(broker, config) -> None:  # type: ignore[no-untyped-def]
    with alpc.create_port("svc.bounds", config=config) as port:
        outcome: list[alpc.Message] = []

        def client() -> None:
            with alpc.connect("svc.bounds", config=config, timeout=5) as comm:
                buffer = bytearray(100)
                outcome.append(comm.request(b"x", grant=alpc.MemoryGrant(buffer, write=True), timeout=10))

        thread = threading.Thread(target=client)
        thread.start()
        comm = port.listen(timeout=5).accept()
        request = comm.receive(timeout=5)
        grant = request.grant
        assert grant.length == 100 and grant.readable and grant.writable
        with pytest.raises(alpc.SectionError, match="outside"):
            grant.read(90, 11)
        with pytest.raises(alpc.SectionError, match="outside"):
            grant.write(b"x", 100)
        grant.write(b"ok", 98)
        with pytest.raises(alpc.SectionError, match="does not allow"):
            request.grant.__class__(request, grant.attr._replace(access=1)).write(b"x")
        request.reply(b"done")
        with pytest.raises(alpc.SectionError, match="ended"):
            grant.read(0, 1)
        thread.join(10)
        assert outcome[0].data == b"done"
        comm.close()


def _chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid)
    for entry in path.iterdir():
        os.chown(entry, uid, uid)


@pytest.fixture
def other_uid_dir() -> Iterator[Path]:
    """A runtime dir owned by uid 65534 (nobody), for a broker and server running as that uid."""
    path = Path(tempfile.mkdtemp(prefix="alpc-nobody-"))
    os.chmod(path, 0o700)
    os.chown(path, 65534, 65534)
    yield path
    leftovers = [p.name for p in path.iterdir()]
    shutil.rmtree(path)
    if any(name.endswith(".sock") for name in leftovers):
        pytest.fail(f"socket files left behind: {leftovers}")


def test_a_kernel_refusal_falls_back_to_the_section_path(other_uid_dir: Path, spawn) -> None:  # type: ignore[no-untyped-def]
    """A server of another uid may not use process_vm_* on us (EPERM): grants still work."""
    # Started as root (the interpreter lives under /root, 0700) and dropped to
    # 65534 once everything is imported.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import os, sys, locale, alpc.cli; args = alpc.cli._parser().parse_args(sys.argv[1:]); "
            "os.setgroups([]); os.setgid(65534); os.setuid(65534); sys.exit(args.func(args))")
    broker = subprocess.Popen([sys.executable, "-c", code, "--runtime-dir", str(other_uid_dir), "broker"],
                              stdout=subprocess.PIPE, text=True, cwd="/", env=env)
    try:
        assert broker.stdout is not None and broker.stdout.readline().startswith("READY")
        server = spawn.argv([sys.executable, str(SECTION_PEERS), "server", "svc.nobody",
                             "--runtime-dir", str(other_uid_dir), "--as-user", "65534"], env=env)
        assert server.expect("READY")[1] == "65534"
        config = alpc.Config(runtime_dir=other_uid_dir)
        with alpc.connect("svc.nobody", config=config, timeout=5) as comm:
            assert comm.server.uid == 65534
            source = os.urandom(2 * MIB)
            reply = comm.request(b"cmd:grant-read", grant=alpc.MemoryGrant(source), timeout=10)
            assert reply.data == f"sha:{sha(source)}:{len(source)}:direct=False".encode()
            target = bytearray(MIB)
            reply = comm.request(f"cmd:grant-write:{MIB}".encode(), timeout=10,
                                 grant=alpc.MemoryGrant(target, read=False, write=True))
            assert reply.data == b"wrote:direct=False" and target == pattern(MIB)
    finally:
        broker.terminate()
        broker.wait(10)
        if broker.stdout is not None:
            broker.stdout.close()


# -- dying peers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memfd", "posix"])
@pytest.mark.parametrize("view", [False, True])
def test_a_client_killed_mid_transfer_leaves_nothing(broker, config, spawn, runtime_dir, backend: str,  # type: ignore[no-untyped-def]
                                                     view: bool) -> None:
    with alpc.create_port("svc.stream", alpc.PortAttributes(allow_unsealed_sections=True), config=config) as port:
        streamer = spawn.argv([sys.executable, str(SECTION_PEERS), "streamer", "svc.stream", "--runtime-dir",
                               str(runtime_dir), "--section-backend", backend, "--allow-unsealed",
                               "--size", str(3 * MIB), *(["--view"] if view else [])])
        comm = port.listen(timeout=10).accept()
        streamer.expect("READY")
        first = comm.receive(timeout=10)
        assert len(first.view if first.view is not None else first.data) == 3 * MIB
        if first.view is not None:
            first.view.release()
        streamer.expect("SENDING")
        streamer.kill()
        while True:
            event = port.wait(timeout=10)
            if isinstance(event, alpc.Message) and event.type is alpc.MessageType.CLIENT_DIED:
                break
            if isinstance(event, alpc.Message) and event.view is not None:
                event.view.release()
        assert port.connections == []


@pytest.mark.parametrize("read_bodies", [True, False])
def test_a_stream_beyond_the_senders_quota_flows_whether_bodies_are_read_or_dropped(  # type: ignore[no-untyped-def]
        broker, config, spawn, runtime_dir, read_bodies: bool) -> None:
    # Bodies are copied out when first read: until then each holds its range of the
    # sender's 8 MiB quota, and a body dropped unread gives it back all the same.
    count, size = 12, 3 * MIB
    with alpc.create_port("svc.flow", config=config) as port:
        streamer = spawn.argv([sys.executable, str(SECTION_PEERS), "streamer", "svc.flow", "--runtime-dir",
                               str(runtime_dir), "--size", str(size), "--count", str(count),
                               "--section-size", str(4 * MIB), "--max-section-bytes", str(8 * MIB)])
        comm = port.listen(timeout=10).accept()
        streamer.expect("READY")
        for _ in range(count):
            message = comm.receive(timeout=10)
            assert message.type is alpc.MessageType.DATAGRAM and message.size == size
            if read_bodies:
                assert message.data == pattern(size)
            del message
        streamer.expect("SENT")
        streamer.send("close")
        assert comm.receive(timeout=10).type is alpc.MessageType.PORT_CLOSED


@pytest.mark.parametrize("driver", ["blocking", "asyncio"])
def test_a_clean_close_is_not_a_death_when_our_releases_meet_the_closed_socket(  # type: ignore[no-untyped-def]
        broker, config, spawn, runtime_dir, driver: str) -> None:
    """Bodies dropped unread leave releases to send before the next read. If the peer closed
    (PORT_CLOSED, then its socket) meanwhile, that write fails: the read that follows still
    finds the PORT_CLOSED, and the connection ends as closed, not as CLIENT_DIED."""
    from alpc import aio

    size = 64 * 1024

    def start_streamer():  # type: ignore[no-untyped-def]
        return spawn.argv([sys.executable, str(SECTION_PEERS), "streamer", "svc.tidy", "--runtime-dir",
                           str(runtime_dir), "--size", str(size), "--count", "2"])

    def stream_then_close(streamer, messages) -> None:  # type: ignore[no-untyped-def]
        for message in messages:
            assert message.type is alpc.MessageType.DATAGRAM and message.size == size
            # (dropped unread: its release is queued, to go out before our next read)
        streamer.expect("SENT")
        streamer.send("close")
        assert streamer.proc.wait(10) == 0  # its PORT_CLOSED is sent and its socket closed

    if driver == "blocking":
        with alpc.create_port("svc.tidy", config=config) as port:
            streamer = start_streamer()
            comm = port.listen(timeout=10).accept()
            streamer.expect("READY")
            stream_then_close(streamer, [comm.receive(timeout=10) for _ in range(2)])
            ended = comm.receive(timeout=10)
            assert ended.type is alpc.MessageType.PORT_CLOSED, ended
        return

    async def run() -> alpc.Message:
        async with await aio.create_port("svc.tidy", config=config, timeout=10) as port:
            streamer = start_streamer()
            comm = await (await port.listen(timeout=10)).accept()
            streamer.expect("READY")
            stream_then_close(streamer, [await comm.receive(timeout=10) for _ in range(2)])
            return await comm.receive(timeout=10)

    ended = asyncio.run(run())
    assert ended.type is alpc.MessageType.PORT_CLOSED, ended


@pytest.mark.parametrize("driver", ["blocking", "asyncio"])
def test_a_sender_waiting_for_space_asks_again_after_bodies_are_dropped_unread(  # type: ignore[no-untyped-def]
        broker, config, monkeypatch: pytest.MonkeyPatch, driver: str) -> None:
    """A body dropped unread is released by its finalizer, which tells nobody. If the sender's
    request for releases came while the bodies were still held, only asking again gets it the
    space: a multiplexing server (which never blocks on this connection's socket) answers the
    next ask. Deterministic: the server drops the bodies only after it read the first ask."""
    from alpc import aio
    from alpc.protocol import Channel

    asked = threading.Event()
    real_runtime = Channel._runtime

    def noting_runtime(channel: Channel, frame, attrs):  # type: ignore[no-untyped-def]
        if frame.type is alpc.MessageType.RELEASE_WANTED:
            asked.set()  # read while the bodies are still held: nothing to release yet
        return real_runtime(channel, frame, attrs)

    monkeypatch.setattr(Channel, "_runtime", noting_runtime)
    small = alpc.Config(runtime_dir=config.runtime_dir, section_size=4 * MIB, max_section_bytes=8 * MIB)
    payload = b"s" * (3 * MIB)
    sent: list[int] = []

    def send_three() -> None:
        if driver == "blocking":
            with alpc.connect("svc.reask", config=small, timeout=10) as comm:
                for _ in range(3):
                    comm.send(payload, timeout=20)
                    sent.append(1)
                comm.request(b"done", timeout=20)
            return

        async def run() -> None:
            comm = await aio.connect("svc.reask", config=small, timeout=10)
            for _ in range(3):
                await comm.send(payload, timeout=20)
                sent.append(1)
            await comm.request(b"done", timeout=20)
            await comm.close()

        asyncio.run(run())

    with alpc.create_port("svc.reask", config=config) as port:
        sender = threading.Thread(target=send_three)
        sender.start()
        held: list[alpc.Message] = []
        while len(held) < 2:
            event = port.wait(timeout=10)
            if isinstance(event, alpc.ConnectionRequest):
                event.accept()
            else:
                held.append(event)
        while not asked.is_set():  # the pump that reads the ask
            with pytest.raises(alpc.Timeout):
                port.wait(timeout=0.05)
        assert len(sent) == 2 and all(message.size == len(payload) for message in held)
        del held  # unread: the finalizers queue the releases and tell nobody
        third = port.wait(timeout=10)
        assert isinstance(third, alpc.Message) and third.data == payload
        done = port.wait(timeout=10)
        assert isinstance(done, alpc.Message) and done.data == b"done"
        done.reply(b"ok")
        sender.join(10)
        assert len(sent) == 3


def test_a_dead_peers_leftover_names_are_swept(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    with alpc.create_port("svc.sweep", config=config) as port:
        streamer = spawn.argv([sys.executable, str(SECTION_PEERS), "streamer", "svc.sweep", "--runtime-dir",
                               str(runtime_dir), "--leave-name", "--size", "1000"])
        comm = port.listen(timeout=10).accept()
        (name,) = streamer.expect("LEFT")
        streamer.expect("SENDING")
        assert name.lstrip("/") in os.listdir("/dev/shm")
        streamer.kill()
        while True:
            event = port.wait(timeout=10)
            if isinstance(event, alpc.Message) and event.type is alpc.MessageType.CLIENT_DIED:
                break
        assert comm.closed and name.lstrip("/") not in os.listdir("/dev/shm")


def test_a_server_killed_mid_transfer_fails_the_client_cleanly(broker, runtime_dir, section_server) -> None:  # type: ignore[no-untyped-def]
    server = section_server("svc.dies", "--section-backend", "posix", "--allow-unsealed")
    config = alpc.Config(runtime_dir=runtime_dir, section_backend="posix", allow_unsealed_sections=True)
    with alpc.connect("svc.dies", config=config, timeout=5) as comm:
        reply = comm.request(b"cmd:view:" + str(MIB).encode(), timeout=10)
        errors: list[BaseException] = []

        def pump() -> None:
            try:
                while True:
                    comm.request(os.urandom(2 * MIB), timeout=10)
            except alpc.AlpcError as exc:
                errors.append(exc)

        thread = threading.Thread(target=pump)
        thread.start()
        server.kill()
        thread.join(20)
        assert errors and isinstance(errors[0], alpc.PeerGone)
        assert reply.view is not None and bytes(reply.view.memory[:4]) == PATTERN[:4]
        reply.view.release()

"""Quick-LPC end to end with real processes: negotiation (and declining it),
correctness next to the socket path, timeouts, hostile rings, and SIGKILL of
either side while the other waits on the rings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import alpc
from alpc import _native, qlpc

QLPC_PEERS = Path(__file__).resolve().parent / "qlpc_peers.py"
ROOT = Path(__file__).resolve().parent.parent
native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
# How long a survivor may take to notice a SIGKILLed peer (it is a watcher thread's
# epoll wake-up; the bound is loose for a loaded machine).
PROMPT = 2.0

Start = Callable[..., object]


@pytest.fixture
def peer(spawn, runtime_dir: Path) -> Start:  # type: ignore[no-untyped-def]
    return peer_starter(spawn, runtime_dir)


def peer_starter(spawn, runtime_dir: Path) -> Start:  # type: ignore[no-untyped-def]
    """peer(role, name, *options, env=None) starts tests/qlpc_peers.py and waits for READY."""
    def start(role: str, name: str, *options: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        process = spawn.argv([sys.executable, str(QLPC_PEERS), role, name, "--runtime-dir", str(runtime_dir),
                              *options], env=env)
        process.ready = process.expect("READY")
        return process
    return start


def pure_env() -> dict[str, str]:
    return {**os.environ, "ALPC_PUREPYTHON": "1"}


def connect(config: alpc.Config, name: str, **options: object) -> alpc.CommunicationPort:
    if options:
        config = alpc.Config(runtime_dir=config.runtime_dir, **options)  # type: ignore[arg-type]
    return alpc.connect(name, config=config, timeout=10)


def shm_names_of(*pids: int) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if any(f"{pid}-" in name for pid in pids)]


# -- negotiation ------------------------------------------------------------------


@native
def test_both_sides_use_the_rings_when_both_can(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    server = peer("server", "q.both")
    with connect(config, "q.both") as comm:
        assert comm.quick
        # The first post may find the server still in poll() and ring its socket
        # doorbell; the next one then waits for the server to read that.
        for i in range(3):
            assert comm.call(f"hello{i}".encode()) == f"HELLO{i}".encode()
        reply = comm.request(b"world", timeout=5)
        assert (reply.type, reply.data) == (alpc.MessageType.REPLY, b"WORLD")
        assert reply.callback_id & 0x40000000  # a ring request's id
        server.expect("ACCEPTED")
        counts = comm._quick.ring.counts()  # type: ignore[union-attr]
        assert counts["messages_out"] == counts["messages_in"] >= 3


def test_a_client_without_the_extension_declines_and_uses_the_socket(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """ALPC_PUREPYTHON=1 does not fake the rings: it declines them, and says why."""
    peer("server", "q.pure")
    client = peer("client", "q.pure", env=pure_env())
    assert client.ready[1] == "False"
    client.send("call abc")
    assert client.expect("REPLY") == ["ABC"]


def test_a_server_without_the_extension_offers_nothing(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    server = peer("server", "q.pureserver", env=pure_env())
    assert server.ready[1] == "False"
    with connect(config, "q.pureserver") as comm:
        assert not comm.quick
        assert comm.call(b"abc") == b"ABC"


def test_a_client_may_decline(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    peer("server", "q.decline")
    with connect(config, "q.decline", quick_lpc=False) as comm:
        assert not comm.quick
        assert comm.call(b"abc") == b"ABC"


def test_a_port_that_does_not_opt_in_offers_nothing(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    peer("server", "q.off", "--no-quick")
    with connect(config, "q.off") as comm:
        assert not comm.quick
        assert comm.call(b"abc") == b"ABC"


def test_unavailable_reason_matches_the_mode() -> None:
    assert qlpc.available() == (qlpc.unavailable_reason() is None)
    assert qlpc.available() == (_native.IMPLEMENTATION == "c")


# -- correctness next to the socket path ------------------------------------------


@native
@pytest.mark.parametrize("mode", ["serve", "receive", "wait"])
def test_small_and_large_messages_on_every_server_loop(broker, config, peer, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Small bodies take the rings, large ones the socket and sections, in both directions."""
    peer("server", f"q.mix.{mode}", "--mode", mode)
    with connect(config, f"q.mix.{mode}") as comm:
        assert comm.quick
        payload_max = comm._quick.payload_max  # type: ignore[union-attr]
        for size in (0, 1, 64, payload_max, payload_max + 1, 4096, 1 << 20):
            body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
            assert comm.call(body) == body.upper()
        for size in (10, payload_max + 1, 70000):
            assert len(comm.call(f"big:{size}".encode())) == size
            assert comm.request(f"big:{size}".encode(), timeout=5).data == b"b" * size
        ring = comm._quick.ring.counts()  # type: ignore[union-attr]
        assert ring["messages_out"] >= 4


@native
def test_one_senders_datagrams_and_requests_stay_in_order(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """Datagrams take the socket and requests the ring; the server still sees them in send order."""
    peer("server", "q.order", "--mode", "receive")
    with connect(config, "q.order") as comm:
        expected = []
        for i in range(40):
            comm.send(f"d{i}".encode())
            expected.append(f"D:d{i}")
            assert comm.call(f"r{i}".encode()) == f"R{i}".encode()
            expected.append(f"r{i}")
            if i % 7 == 0:
                comm.send(b"x" * 2000)  # a section datagram now and then
                expected.append("D:" + "x" * 2000)
        assert comm.call(b"order").decode().split(" ") == expected


@native
def test_a_reply_after_a_datagram_from_the_server_is_not_overtaken(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    peer("server", "q.push")
    with connect(config, "q.push") as comm:
        for i in range(20):
            assert comm.call(f"push:p{i}".encode()) == b"pushed"
            assert comm.receive(timeout=0).data == f"p{i}".encode()


@native
def test_concurrent_callers_get_their_own_replies(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """One call at a time takes the rings; the others take the socket; every reply is matched."""
    peer("server", "q.threads", "--mode", "receive")
    errors: list[str] = []
    with connect(config, "q.threads") as comm:
        def caller(n: int) -> None:
            for i in range(150):
                body = f"t{n}-{i}".encode()
                try:
                    got = comm.call(body, timeout=10) if i % 2 else comm.request(body, timeout=10).data
                except alpc.AlpcError as exc:  # a caller left waiting fails the test too
                    errors.append(f"{body!r}: {exc!r}")
                    return
                if got != body.upper():
                    errors.append(f"{body!r} got {got!r}")

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        counts = comm._quick.ring.counts()  # type: ignore[union-attr]
        assert 0 < counts["messages_out"] < 900


@native
def test_a_call_times_out_and_its_late_reply_is_dropped(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    server = peer("server", "q.timeout", "--mode", "receive")
    with connect(config, "q.timeout") as comm:
        started = time.monotonic()
        with pytest.raises(alpc.Timeout):
            comm.call(b"noreply", timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 2
        server.expect("NOREPLY")
        with pytest.raises(alpc.Timeout):
            comm.request(b"noreply", timeout=0.1)
        for i in range(20):
            assert comm.call(f"after{i}".encode(), timeout=5) == f"AFTER{i}".encode()


# -- peers killed while the other side waits on the rings ------------------------


@native
@pytest.mark.parametrize("mode", ["serve", "receive", "wait"])
def test_sigkill_of_the_server_during_a_call(broker, config, peer, mode: str) -> None:  # type: ignore[no-untyped-def]
    server = peer("server", f"q.kill.{mode}", "--mode", mode)
    server_pid = int(server.ready[0])
    with connect(config, f"q.kill.{mode}") as comm:
        assert comm.call(b"warm") == b"WARM"
        failure: list[BaseException] = []

        def hang() -> None:
            try:
                comm.call(b"noreply", timeout=30)
            except BaseException as exc:
                failure.append(exc)

        waiter = threading.Thread(target=hang)
        waiter.start()
        server.expect("NOREPLY")
        killed = time.monotonic()
        server.kill()
        waiter.join(10)
        assert not waiter.is_alive()
        assert time.monotonic() - killed < PROMPT
        assert isinstance(failure[0], alpc.PeerGone)
        with pytest.raises(alpc.PeerGone):
            comm.call(b"again")
    assert shm_names_of(server_pid, os.getpid()) == []


@native
@pytest.mark.parametrize("mode", ["serve", "receive", "wait"])
def test_sigkill_of_the_client_during_a_wait(broker, config, peer, mode: str) -> None:  # type: ignore[no-untyped-def]
    """The server is blocked on the rings (serve_requests / receive) or in poll (wait)."""
    server = peer("server", f"q.clientkill.{mode}", "--mode", mode)
    client = peer("client", f"q.clientkill.{mode}")
    assert client.ready[1] == "True"
    client.send("call warm")
    assert client.expect("REPLY") == ["WARM"]
    server.expect("ACCEPTED")
    killed = time.monotonic()
    client.kill()
    words = server.expect("CLIENT_DIED")
    assert time.monotonic() - killed < PROMPT
    assert words[0] == str(client.pid)
    # The server goes on serving others.
    with connect(config, f"q.clientkill.{mode}") as comm:
        assert comm.call(b"still") == b"STILL"
    assert shm_names_of(client.pid, int(server.ready[0])) == []


@native
def test_sigkill_of_the_client_mid_write(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """A client killed half way through an entry leaves bytes but no published index."""
    server = peer("server", "q.halfway")
    hostile = peer("hostile", "q.halfway", "--damage", "half")
    hostile.expect("DAMAGED")
    hostile.kill()
    assert server.expect("CLIENT_DIED")[0] == str(hostile.pid)
    with connect(config, "q.halfway") as comm:
        assert comm.call(b"fine") == b"FINE"


# -- hostile rings ------------------------------------------------------------------


@native
@pytest.mark.parametrize(("damage", "reason"), [
    ("length", "longer_than_its_slot"),
    ("bulk", "longer_than_its_slot"),
    ("index", "claims_more_entries"),
    ("kind", "wrong_kind"),
    ("reserved", "reserved_words"),
    ("id", "missing_id"),
])
@pytest.mark.parametrize("mode", ["serve", "receive"])
def test_a_hostile_client_loses_only_its_own_connection(broker, config, peer, damage: str,  # type: ignore[no-untyped-def]
                                                       reason: str, mode: str) -> None:
    server = peer("server", f"q.hostile.{damage}", "--mode", mode)
    with connect(config, f"q.hostile.{damage}") as honest:
        hostile = peer("hostile", f"q.hostile.{damage}", "--damage", damage)
        assert hostile.ready[1] == "True"
        hostile.expect("DAMAGED")
        words = server.expect("CLIENT_DIED")
        assert words[0] == str(hostile.pid)
        assert "protocol_error" in words[1] and reason in words[1]
        assert honest.call(b"unaffected") == b"UNAFFECTED"


@native
@pytest.mark.parametrize(("damage", "reason"), [
    ("length", "longer than its slot"),
    ("bulk", "longer than its slot"),
    ("index", "claims more entries"),
    ("kind", "wrong kind"),
    ("reserved", "reserved words"),
    ("id", "missing id"),
])
def test_a_hostile_server_gets_the_client_to_drop_the_connection(broker, config, peer, damage: str,  # type: ignore[no-untyped-def]
                                                                 reason: str) -> None:
    server = peer("server", f"q.badserver.{damage}", "--hostile-reply", damage)
    with connect(config, f"q.badserver.{damage}") as comm:
        with pytest.raises(alpc.PeerGone, match=reason):
            comm.call(b"victim", timeout=10)
        assert server.expect("REQUEST") == ["victim", "True"]
        assert comm.closed
    server.expect("CLIENT_DIED")


@native
def test_an_unsealed_or_write_sealed_ring_is_refused(tmp_path: Path) -> None:
    """A server's memfd must be size-sealed (no SIGBUS) and writable by us."""
    import fcntl

    size = _native.quick_region_size(2, 64)
    for seals in (0, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE):
        fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        with pytest.raises(alpc.ProtocolError):
            qlpc.QuickLink.accept(fd, 2, 64, 0, 0, None)  # consumes fd (the leak check would notice)


def test_the_peers_script_runs_standalone() -> None:
    done = subprocess.run([sys.executable, str(QLPC_PEERS), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=30)
    assert done.returncode == 0 and "hostile" in done.stdout


@native
def test_both_sides_in_one_process_leave_nothing_behind(broker, config) -> None:  # type: ignore[no-untyped-def]
    """The port holds the watcher thread while it lives; closing everything stops it (no fds left)."""
    with alpc.create_port("q.local", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        def accept(into: list[alpc.CommunicationPort]) -> None:
            into.append(port.listen(timeout=10).accept())

        for round_ in range(3):
            accepted: list[alpc.CommunicationPort] = []
            listener = threading.Thread(target=accept, args=(accepted,))
            listener.start()
            client = connect(config, "q.local")
            listener.join(10)
            server = accepted[0]
            serving = threading.Thread(target=server.serve_requests, args=(lambda body: body[::-1], 10))
            serving.start()
            assert client.quick
            for i in range(50):
                assert client.call(f"{round_}-{i}".encode()) == f"{round_}-{i}".encode()[::-1]
            client.close()
            serving.join(10)
            assert not serving.is_alive()
            server.close()


@native
def test_receive_and_reply_over_the_rings_count_time_out_and_keep_the_inbox_first(broker, config) -> None:  # type: ignore[no-untyped-def]
    """receive() takes a ring request straight from the ring (not through the inbox): it still
    times out, counts the traffic and the reply's latency, and never overtakes a message that
    already waits in the inbox."""
    with alpc.create_port("q.lean", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        accepted: list[alpc.CommunicationPort] = []
        listener = threading.Thread(target=lambda: accepted.append(port.listen(timeout=10).accept()))
        listener.start()
        client = connect(config, "q.lean")
        listener.join(10)
        server = accepted[0]
        try:
            assert client.quick
            with pytest.raises(alpc.Timeout):
                server.receive(timeout=0.05)
            replies: list[bytes] = []
            caller = threading.Thread(target=lambda: replies.append(client.request(b"ring", timeout=10).data))
            caller.start()
            request = server.receive(timeout=10)
            assert (request.type, request.data, request.port) == (alpc.MessageType.REQUEST, b"ring", server)
            assert request.id & alpc.protocol.QUICK_ID_BIT
            assert server.stats.messages_in == 1 and server.stats.bytes_in == 4
            request.reply(b"RING")
            caller.join(10)
            assert replies == [b"RING"]
            assert server.stats.messages_out == 1 and sum(server.stats.latency) == 1
            assert not server.stats.in_flight
            # A datagram in the inbox comes before anything the ring brings later.
            client.send(b"first", timeout=10)
            server.pump()
            assert server.queue_depth == 1
            caller = threading.Thread(target=lambda: replies.append(client.request(b"second", timeout=10).data))
            caller.start()
            assert server.receive(timeout=10).data == b"first"
            second = server.receive(timeout=10)
            assert second.data == b"second"
            second.reply(b"2")
            caller.join(10)
            assert replies == [b"RING", b"2"]
        finally:
            client.close()
            server.close()


@native
def test_a_signal_handler_interrupts_a_blocked_call(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """A call blocked on the rings still lets Python run signal handlers (Ctrl-C, alarms)."""
    class Alarm(Exception):
        pass

    def ring(*_: object) -> None:
        raise Alarm

    server = peer("server", "q.signal", "--mode", "receive")
    previous = signal.signal(signal.SIGALRM, ring)
    try:
        with connect(config, "q.signal") as comm:
            assert comm.call(b"warm") == b"WARM"
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Alarm):
                comm.call(b"noreply", timeout=30)
            assert time.monotonic() - started < 5
            server.expect("NOREPLY")
            # The abandoned request's reply would be dropped; the connection goes on.
            assert comm.call(b"next") == b"NEXT"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@native
def test_a_forked_child_does_not_disturb_the_parent(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """The fork handlers leave the child a usable library and the parent its watcher."""
    peer("server", "q.fork")
    with connect(config, "q.fork") as comm:
        assert comm.call(b"before") == b"BEFORE"
        child = os.fork()
        if child == 0:
            os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        for i in range(20):
            assert comm.call(f"after{i}".encode()) == f"AFTER{i}".encode()


@native
def test_many_clients_of_one_multiplexing_server(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """ConnectionPort.wait() serves every client; ring requests reach it through doorbells."""
    peer("server", "q.many", "--mode", "wait")
    comms = [connect(config, "q.many") for _ in range(6)]
    errors: list[str] = []
    try:
        def caller(n: int) -> None:
            for i in range(100):
                body = f"c{n}-{i}".encode()
                if comms[n].call(body, timeout=10) != body.upper():
                    errors.append(body.decode())

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(len(comms))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        assert all(comm.quick for comm in comms)
    finally:
        for comm in comms:
            comm.close()


@native
def test_a_multiplexing_server_arms_only_the_rings_that_were_used(broker, config,  # type: ignore[no-untyped-def]
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A wait() arms the rings taken from since it last slept, not every client's: with many idle
    clients a busy one's round trip stays O(1). Idle rings stay armed and still wake the server."""
    armed: list[int] = []
    real_arm = qlpc.QuickLink.arm

    def counting_arm(link: qlpc.QuickLink) -> bool:
        armed.append(1)
        return real_arm(link)

    monkeypatch.setattr(qlpc.QuickLink, "arm", counting_arm)
    stop = threading.Event()
    with alpc.create_port("q.idle", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        def serve() -> None:
            while not stop.is_set():
                try:
                    event = port.wait(timeout=0.2)
                except alpc.Timeout:
                    continue
                if isinstance(event, alpc.ConnectionRequest):
                    event.accept()
                elif event.type is alpc.MessageType.REQUEST:
                    event.reply(event.data.upper())

        server = threading.Thread(target=serve)
        server.start()
        comms = [connect(config, "q.idle") for _ in range(41)]
        try:
            busy, idle = comms[0], comms[1:]
            assert all(comm.quick for comm in comms)
            assert busy.call(b"warm", timeout=10) == b"WARM"
            armed.clear()
            for i in range(200):
                assert busy.call(b"b%d" % i, timeout=10) == b"B%d" % i
            assert len(armed) <= 3 * 200  # every client's ring each time would be 40 per wait
            for n, comm in enumerate(idle):
                assert comm.call(b"idle %d" % n, timeout=10) == b"IDLE %d" % n
        finally:
            for comm in comms:
                comm.close()
            stop.set()
            server.join(10)


@native
def test_ring_calls_take_any_timeout_a_socket_call_takes(broker, config, peer) -> None:  # type: ignore[no-untyped-def]
    """An infinite timeout raised OverflowError from the ring call (int(inf * 1e9)), a NaN one a
    bare ValueError from int(); a negative one failed at once as a timeout. They are capped,
    or refused with the ValueError every other wait gives, as on the socket path."""
    peer("server", "q.timeouts")
    with connect(config, "q.timeouts") as comm:
        assert comm.quick
        assert comm.call(b"inf", timeout=float("inf")) == b"INF"
        assert comm.call(b"big", timeout=1e300) == b"BIG"
        for bad in (-1.0, float("nan")):
            with pytest.raises(ValueError, match="timeout must be"):
                comm.call(b"bad", timeout=bad)
        assert comm.call(b"after", timeout=5) == b"AFTER"


@native
def test_serving_on_the_rings_takes_any_timeout_a_socket_wait_takes(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    """serve_requests(timeout=inf) over the rings raised OverflowError; NaN a bare int() error."""
    with alpc.create_port("q.serve.timeouts", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        client = spawn.argv([sys.executable, str(QLPC_PEERS), "client", "q.serve.timeouts",
                             "--runtime-dir", str(runtime_dir)])
        with port.listen(timeout=10).accept() as comm:
            assert client.expect("READY")[-1] == "True"
            for bad in (-1.0, float("nan")):
                with pytest.raises(ValueError, match="timeout must be"):
                    comm.serve_requests(lambda body: body, timeout=bad)
            client.send("call hi")
            assert client.proc.stdin is not None
            client.proc.stdin.close()  # the client answers, then exits: a notice ends serving
            other = comm.serve_requests(lambda body: body.upper(), timeout=float("inf"))
            assert other.type in (alpc.MessageType.PORT_CLOSED, alpc.MessageType.CLIENT_DIED)
            assert client.expect("REPLY") == ["HI"]

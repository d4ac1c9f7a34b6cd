"""The broker and the connect path against hostile local peers and a broker that stalls.

See each docstring for what used to go wrong. The broker runs in this
process (the ``broker`` fixture) so its books can be read directly.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import selectors
import socket
import struct
import termios
import time
from pathlib import Path

import msgpack
import pytest

import alpc
from alpc import control
from alpc.exchange import control_frame
from alpc.security import MAX_ACL_ENTRIES
from alpc.stats import MAX_AGES
from alpc.wire import FrameDecoder, FrameLimits, MessageType, encode_frame

pytestmark = pytest.mark.timeout(120)

_HUGE_ID = 2**64 - 1  # the widest int msgpack carries: 9 bytes on the wire
_ANY = FrameLimits(allowed_types=frozenset(MessageType), max_data=control.MAX_CONTROL_BODY, max_fds=1)


def _raw(config: alpc.Config) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(config.broker_socket))
    return sock


def _send(sock: socket.socket, body: control.Body) -> None:
    sock.sendall(b"".join(control_frame(body)))


def _one_frame(sock: socket.socket):  # type: ignore[no-untyped-def]
    decoder = FrameDecoder(_ANY)
    while True:
        data = sock.recv(decoder.wanted())
        if not data:
            return None
        frames = decoder.feed(data)
        if frames:
            return frames[0]


def _create(config: alpc.Config, name: str, **kwargs: object):  # type: ignore[no-untyped-def]
    """A raw CREATE_PORT; (socket, the broker's answer frame)."""
    sock = _raw(config)
    request = dict(name=name, max_message_length=1024, max_connect_data=64, max_pending_connects=8)
    request.update(kwargs)
    _send(sock, control.CreatePort(**request))  # type: ignore[arg-type]
    return sock, _one_frame(sock)


def _raw_port(config: alpc.Config, name: str, **kwargs: object) -> socket.socket:
    sock, frame = _create(config, name, **kwargs)
    assert frame is not None and frame.type is MessageType.PORT_CREATED, frame
    return sock


def _until(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition the broker's own thread brings about (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        select.select([], [], [], 0.001)


# -- a counter a server reports makes every `alpc stats` fail --------------------------------


def test_a_servers_huge_counter_does_not_break_stats_for_everyone(broker: alpc.Broker, config: alpc.Config) -> None:
    """A port owner reports quota_refusals = 2**64-1; the broker adds its own refusals to it
    (_port_stats) and msgpack cannot encode the sum: the STATS reply raises OverflowError in
    the loop, the asker is dropped as an "internal error", and `alpc stats` (every port the
    asker may see, root's view included) fails for as long as that port lives."""
    with alpc.create_port("svc.honest", config=config):
        evil = _raw_port(config, "svc.evil", max_pending_connects=0)
        try:
            # One connect the broker refuses at max_pending_connects (0): port.quota_refusals = 1.
            client = _raw(config)
            _send(client, control.Connect(name="svc.evil", data=b"", max_message_length=1024,
                                          max_section_bytes=0))
            refusal = _one_frame(client)
            client.close()
            assert refusal is not None and refusal.type is MessageType.ERROR
            _send(evil, control.PortStatus(counters=control.PortCounters(quota_refusals=2**64 - 1)))
            _until(lambda: alpc.list_peers("svc.evil", config).report_age_ms >= 0)
            assert alpc.port_stats("svc.honest", config).ports[0].name == "svc.honest"
            stats = alpc.port_stats("", config)  # BrokerUnavailable on the current code
            assert [p.name for p in stats.ports] == ["svc.evil", "svc.honest"]
        finally:
            evil.close()


# -- a query client that never reads grows the broker's outbox without bound -------------------


def _outq(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def _query_peer(broker: alpc.Broker):  # type: ignore[no-untyped-def]
    for peer in list(broker._peers.values()):
        if peer.role == "query" and peer.cred.pid == os.getpid():
            return peer
    return None


def _held(peer) -> int:  # type: ignore[no-untyped-def]
    if peer is None:
        return 0
    return sum(len(b) for item in list(peer.outbox) for b in list(item.buffers))


def _reading(broker: alpc.Broker, peer) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(broker._selector.get_key(peer.stream.fileno()).events & selectors.EVENT_READ)
    except (KeyError, ValueError, RuntimeError):
        return True


def test_a_query_client_that_never_reads_cannot_grow_the_broker_without_bound(
        broker: alpc.Broker, config: alpc.Config) -> None:
    """LIST_PORTS frames are 40-odd bytes; the answer (here one port whose ACL names 4096 uids,
    shown to its owner's uid) is ~12 KiB. The broker keeps reading a query connection whose
    answers it cannot deliver and queues every answer in memory (_Peer.outbox, no bound): a
    client pipelining N queries and never reading makes the broker hold ~N x 12 KiB. Any
    local user can do this to a shared broker (with ports of its own)."""
    limit = 8 * 1024 * 1024
    owner = _raw_port(config, "svc.big", acl=control.AclSpec(allow_uids=tuple(range(1000, 5096))))
    query = _raw(config)
    try:
        queries = 2000
        query.sendall(b"".join(control_frame(control.ListPorts())) * queries)
        # Until the broker read all of it, stopped reading us, or already holds too much.
        state = {}

        def settled() -> bool:
            peer = _query_peer(broker)
            state["held"] = _held(peer)
            if state["held"] > limit:
                return True
            if _outq(query) == 0:
                return True
            return peer is not None and bool(peer.outbox) and not _reading(broker, peer)

        _until(settled, timeout=40)
        assert state["held"] <= limit, f"the broker holds {state['held']} bytes of answers for one client"
    finally:
        query.close()
        owner.close()


def _blocked_in_send(thread) -> bool:  # type: ignore[no-untyped-def]
    """Is ``thread`` waiting for room in a socket (Stream._wait_writable)?"""
    import sys

    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "_wait_writable":
            return True
        frame = frame.f_back
    return False


# -- listen(timeout) waits out the keeper's 5 s status send to a broker that stopped reading ------


def test_listen_keeps_its_timeout_while_the_broker_reads_nothing(spawn, runtime_dir, config: alpc.Config) -> None:  # type: ignore[no-untyped-def]
    """The keeper sends status reports holding the registration's lock (REPORT_SEND_TIMEOUT,
    5 s); listen()/wait() take that lock (wait_fds, read) before they honour their own timeout.
    A broker that stops reading for a while (stopped, swapped out, busy in a handover) and a
    port whose reports filled the socket: listen(timeout=0.2) takes ~5 s."""
    import signal
    import sys
    import threading

    broker = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker"])
    broker.expect("READY")
    port = alpc.create_port("svc.chatty", config=config, report_interval=0.001)
    connected = {}
    thread = threading.Thread(target=lambda: connected.setdefault("comm", alpc.connect(
        "svc.chatty", config=config, timeout=10)))
    thread.start()
    port.listen(10).accept()
    thread.join(10)
    comm = connected["comm"]
    link = port._link
    try:
        broker.proc.send_signal(signal.SIGSTOP)
        # Reports pile up (a client is connected, so every interval sends one) until the
        # socket is full and the keeper waits in send() holding the link's lock.
        _until(lambda: _blocked_in_send(link._thread))
        started = time.monotonic()
        with pytest.raises(alpc.Timeout):
            port.listen(timeout=0.2)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"listen(timeout=0.2) took {elapsed:.2f}s"
    finally:
        broker.proc.send_signal(signal.SIGCONT)
        comm.close()
        port.close()
        broker.proc.send_signal(signal.SIGTERM)
        broker.proc.wait(10)


# -- a full listen backlog: a connect waits for it, within its timeout ---------------------------


def test_a_connect_waits_for_a_busy_broker_within_its_timeout(spawn, runtime_dir, config: alpc.Config) -> None:  # type: ignore[no-untyped-def]
    """A Unix connect to a full listen backlog fails at once with EAGAIN on a non-blocking
    socket (what socket.settimeout makes): connects to a broker briefly busy (a handover:
    "connects made meanwhile wait in the listen backlog") used to fail at once with
    BrokerUnavailable. Now a connect waits in the kernel until the broker accepts it, or
    until its timeout (Timeout)."""
    import signal
    import sys
    import threading

    broker = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker"])
    broker.expect("READY")
    filler = []
    outcome: dict[str, BaseException] = {}
    waiter_tid: list[int] = []

    def connect_while_stopped() -> None:
        waiter_tid.append(threading.get_native_id())
        try:
            alpc.connect("svc.any", config=config, timeout=30)
        except alpc.AlpcError as exc:
            outcome["error"] = exc

    waiter = threading.Thread(target=connect_while_stopped)
    try:
        broker.proc.send_signal(signal.SIGSTOP)
        while True:  # fill the backlog of the (stopped) broker
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(config.broker_socket))
            except BlockingIOError:
                sock.close()
                break
            filler.append(sock)
        started = time.monotonic()
        with pytest.raises(alpc.Timeout):
            alpc.connect("svc.any", config=config, timeout=1.0)
        assert time.monotonic() - started >= 0.9
        waiter.start()
        # The handshake: the kernel says the thread sleeps waiting for the backlog.
        _until(lambda: bool(waiter_tid) and Path(f"/proc/self/task/{waiter_tid[0]}/wchan").read_text()
               == "unix_wait_for_peer")
        broker.proc.send_signal(signal.SIGCONT)
        waiter.join(20)
        assert not waiter.is_alive()
        # It reached the broker, which has no such port.
        assert isinstance(outcome.get("error"), alpc.PortNotFound), outcome
    finally:
        for sock in filler:
            sock.close()
        broker.proc.send_signal(signal.SIGCONT)
        waiter.join(20)
        broker.proc.send_signal(signal.SIGTERM)
        broker.proc.wait(10)


def _closed_by_broker(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True


# -- the PortList answer outgrows what every client reads ----------------------------------


def test_create_port_refuses_handle_kinds_no_server_announces(broker: alpc.Broker, config: alpc.Config) -> None:
    """PortLimits.handle_kinds is a list of str, checked for type only: one CREATE_PORT may carry
    ~1 MiB of it (15 strings of 64 KiB), which the broker keeps for the port's life and puts
    into every PortList answer of every viewer. An honest server sends a few HandleKind names."""
    kinds = tuple(f"{i:02d}" * (65536 // 2) for i in range(15))
    sock, frame = _create(config, "svc.fatkinds", acl=control.AclSpec(allow_everyone=True),
                          limits=control.PortLimits(handle_kinds=kinds))
    try:
        assert frame is not None
        assert frame.type is MessageType.ERROR, "the broker took a port with ~1 MiB of handle_kinds"
        assert control.decode_body(frame.type, frame.data, control.ErrorReply).code == control.ErrorCode.BAD_REQUEST
    finally:
        sock.close()
    assert alpc.list_ports(config) == ()


def test_ports_with_fat_handle_kinds_cannot_break_alpc_ports(broker: alpc.Broker, config: alpc.Config) -> None:
    """18 such ports (well under max_ports_per_uid, 256) push the PortList past the client's
    MAX_CONTROL_BODY: the broker sends it anyway and list_ports() (`alpc ports`) fails with a
    ProtocolError for everyone who may see them (allow_everyone: every local user)."""
    kinds = tuple(f"{i:02d}" * (65536 // 2) for i in range(15))
    socks = []
    try:
        with alpc.create_port("svc.honest", config=config):
            for i in range(18):
                sock, frame = _create(config, f"svc.fat{i:02d}", acl=control.AclSpec(allow_everyone=True),
                                      limits=control.PortLimits(handle_kinds=kinds))
                socks.append(sock)
                assert frame is not None
            names = [p.name for p in alpc.list_ports(config)]  # ProtocolError on the current code
            assert "svc.honest" in names
    finally:
        for sock in socks:
            sock.close()


def test_port_list_fits_the_client_limit_whatever_the_ports_report(broker: alpc.Broker,
                                                                   config: alpc.Config) -> None:
    """Even with only valid fields: a port's report may name MAX_REPORTED_PEERS (2048) clients,
    ~80 KiB of ClientInfo in the PortList at the widest ints, so 206 ports of one uid (its
    quota is 256) make a PortList over 16 MiB. The broker must answer something the client
    can read (trimmed), not a frame every client refuses."""
    n_ports = 206
    report = control.PortStatus(
        peers=tuple(control.PeerReport(
            pid=_HUGE_ID, uid=_HUGE_ID, gid=_HUGE_ID, connected_ms=0, queue_depth=0, in_flight=0,
            in_flight_ages_ms=(), messages_in=0, messages_out=0, bytes_in=0, bytes_out=0, errors=0,
            section_bytes=0) for _ in range(control.MAX_REPORTED_PEERS)),
        peers_total=control.MAX_REPORTED_PEERS)
    frame = b"".join(control_frame(report))
    socks = []
    try:
        with alpc.create_port("svc.honest", config=config):
            for i in range(n_ports):
                sock = _raw_port(config, f"svc.wide{i:03d}", acl=control.AclSpec(allow_everyone=True))
                socks.append(sock)
                sock.sendall(frame)
            _until(lambda: all(p.report_age_ms >= 0 for p in alpc.port_stats("", config).ports
                               if p.name.startswith("svc.wide")))
            ports = alpc.list_ports(config)  # ProtocolError on the current code
            names = [p.name for p in ports]
            assert len(names) == n_ports + 1 and "svc.honest" in names
            honest = next(p for p in ports if p.name == "svc.honest")
            assert honest.details  # the small port keeps its details; the fat ones give way
    finally:
        for sock in socks:
            sock.close()


# -- log volume a local client can cause -----------------------------------------------------


def _broker_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "alpc.broker"]


def test_port_create_and_release_lines_are_rate_limited(broker: alpc.Broker, config: alpc.Config,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Every CREATE_PORT logs "port ... created" and every hang-up of its owner "released",
    at INFO (the daemon's default level), outside the LogLimiter every refusal goes through:
    a client creating and closing ports in a loop writes two lines per round trip, unbounded."""
    caplog.set_level(logging.INFO, logger="alpc.broker")
    rounds = 300
    started = time.monotonic()
    for i in range(rounds):
        sock = _raw_port(config, f"svc.churn{i}")  # "created" is logged before PORT_CREATED is sent
        sock.close()
    elapsed = time.monotonic() - started
    created = [r for r in _broker_records(caplog) if "created by" in r.getMessage()]
    # The broker's LogLimiter lets 50 lines through at once and 5 a second after that.
    assert len(created) <= 50 + 5 * elapsed + 5, f"{len(created)} 'created' lines for {rounds} ports in {elapsed:.1f}s"


def test_peer_chosen_text_cannot_make_a_broker_log_line_huge(broker: alpc.Broker, config: alpc.Config,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Refusals and drops are logged once per key and rate-limited by count, but their text
    quotes what the peer sent: a CREATE_PORT with 58 unknown keys of 16 Ki control characters
    each yields one "protocol error: ... unknown fields [...]" line of ~4.6 MB (repr escapes
    them), a CONNECT to a 64 Ki-character name a "no port named ..." line of ~256 KB."""
    caplog.set_level(logging.INFO, logger="alpc.broker")
    request = control.CreatePort(name="svc.noisy", max_message_length=1, max_connect_data=1,
                                 max_pending_connects=1).to_map()
    request.update({chr(1) * 16000 + f"{i:02d}": 0 for i in range(64 - len(request))})
    body = msgpack.packb(request, use_bin_type=True)
    bad = _raw(config)
    bad.sendall(encode_frame(MessageType.CREATE_PORT, body))
    assert _closed_by_broker(bad)  # the drop is logged before the broker closes the socket
    bad.close()
    lost = _raw(config)
    _send(lost, control.Connect(name=chr(1) * 65000, data=b"", max_message_length=1024, max_section_bytes=0))
    frame = _one_frame(lost)  # the refusal is logged before it is sent
    lost.close()
    assert frame is not None and frame.type is MessageType.ERROR
    records = _broker_records(caplog)
    assert any("unknown fields" in r.getMessage() for r in records)
    assert any("no port named" in r.getMessage() for r in records)
    longest = max(len(r.getMessage()) for r in records)
    assert longest <= 4096, f"a broker log line of {longest} characters"


# -- fields kept without a bound --------------------------------------------------------------


def test_acl_duplicates_are_not_kept_or_shown(broker: alpc.Broker, config: alpc.Config) -> None:
    """PortAcl allows MAX_ACL_ENTRIES distinct ids per list, but the broker keeps and shows the
    AclSpec as sent: 100,000 copies of one uid pass the check (a frozenset of 1), cost the
    broker ~3 MB of Python ints per list for the port's life, and go into the owner's and
    root's every PortList."""
    owner = _raw_port(config, "svc.dups", acl=control.AclSpec(allow_uids=(12345,) * 100_000))
    try:
        (info,) = alpc.list_ports(config)  # this test's uid owns the port: it sees the ACL
        assert len(info.acl.allow_uids) <= MAX_ACL_ENTRIES, f"{len(info.acl.allow_uids)} allow_uids kept"
    finally:
        owner.close()


def test_reported_in_flight_ages_are_bounded(broker: alpc.Broker, config: alpc.Config) -> None:
    """A PeerReport carries the ages of the oldest requests in flight, at most MAX_AGES (8) from
    an honest runtime; the broker keeps and serves any number (100,000 here, ~6x the memory of
    the largest honest report per 1 MiB frame)."""
    owner = _raw_port(config, "svc.ages", acl=control.AclSpec(allow_everyone=True))
    try:
        peer = control.PeerReport(pid=1, uid=1, gid=1, connected_ms=0, queue_depth=0, in_flight=100_000,
                                  in_flight_ages_ms=(1,) * 100_000, messages_in=0, messages_out=0,
                                  bytes_in=0, bytes_out=0, errors=0, section_bytes=0)
        _send(owner, control.PortStatus(peers=(peer,), peers_total=1))
        _until(lambda: alpc.list_peers("svc.ages", config).report_age_ms >= 0)
        (shown,) = alpc.list_peers("svc.ages", config).peers
        assert shown.in_flight == 100_000
        assert len(shown.in_flight_ages_ms) <= MAX_AGES, f"{len(shown.in_flight_ages_ms)} ages kept"
    finally:
        owner.close()

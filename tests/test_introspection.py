"""Live introspection: `alpc peers`, `alpc stats`, `--watch`, from figures the servers report."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

import alpc
from alpc import control
from alpc.introspect import latency_percentile
from alpc.protocol import EAGER_COPY_MAX
from alpc.security import PeerCred, PortAcl, may_inspect, may_see_settings
from alpc.stats import ConnectionStats, latency_bucket
from alpc.wire import MessageType, encode_frame

ROOT = Path(__file__).resolve().parent.parent
OPS = Path(__file__).resolve().parent / "ops_peers.py"
T = TypeVar("T")


def run(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def eventually(fetch: Callable[[], T], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Servers report asynchronously (every report_interval); poll the broker's view, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value):
            return value
        assert time.monotonic() < deadline, f"never satisfied: {value}"
        threading.Event().wait(0.02)  # handshake-free: waiting for the server's next report


def only_peer(config: alpc.Config, name: str) -> Callable[[], control.PeerReport | None]:
    def fetch() -> control.PeerReport | None:
        listing = alpc.list_peers(name, config)
        return listing.peers[0] if listing.peers else None
    return fetch


def test_peers_show_queue_depth_in_flight_requests_and_their_age(broker: alpc.Broker, config: alpc.Config,
                                                                 runtime_dir: Path, spawn) -> None:
    with alpc.create_port("svc.inspect", config=config, report_interval=0.05) as port:
        client = spawn("client", "svc.inspect")
        comm = port.listen(timeout=10).accept()
        client.expect("READY")
        for number in range(5):
            client.send(f"send d{number}")
            client.expect("SENT")
        # All five are in the socket: one read takes them, the application takes one.
        assert comm.receive(timeout=5).data == b"d0"
        peer = eventually(only_peer(config, "svc.inspect"), lambda p: p is not None and p.queue_depth == 4)
        assert peer is not None
        assert (peer.pid, peer.uid, peer.gid) == (client.pid, os.getuid(), os.getgid())
        assert peer.messages_in == 5 and peer.bytes_in == 10 and peer.in_flight == 0
        assert peer.section_bytes == 0
        for _ in range(4):
            comm.receive(timeout=5)
        client.send("pending held")
        request = comm.receive(timeout=5)
        assert request.type is alpc.MessageType.REQUEST
        peer = eventually(only_peer(config, "svc.inspect"),
                          lambda p: p is not None and p.in_flight == 1 and p.in_flight_ages_ms[0] >= 200)
        assert peer is not None and peer.queue_depth == 0
        table = run(runtime_dir, "peers", "svc.inspect")
        assert table.returncode == 0, table.stderr
        assert str(client.pid) in table.stdout and "IN-FLIGHT" in table.stdout
        comm.reply(request, b"done")
        client.expect("REPLY")
        peer = eventually(only_peer(config, "svc.inspect"), lambda p: p is not None and p.in_flight == 0)
        assert peer is not None and peer.messages_out == 1 and peer.bytes_out == 4
        listing = json.loads(run(runtime_dir, "peers", "svc.inspect", "--json").stdout)
        assert listing["name"] == "svc.inspect" and listing["pid"] == os.getpid()
        assert listing["peers"][0]["pid"] == client.pid and listing["peers_total"] == 1
        comm.close()


def test_peers_include_the_clients_an_asyncio_server_accepted(broker: alpc.Broker, config: alpc.Config,
                                                             spawn) -> None:
    import asyncio

    import alpc.aio

    def peers_when(ok: Callable[[control.PeerList], bool]) -> control.PeerList:
        return eventually(lambda: alpc.list_peers("svc.aioinspect", config), ok)

    async def main() -> None:
        port = await alpc.aio.create_port("svc.aioinspect", config=config, timeout=10)
        loop = asyncio.get_running_loop()
        try:
            client = spawn("client", "svc.aioinspect")
            comm = await (await port.listen(timeout=10)).accept()
            client.expect("READY")
            client.send("send hello")
            client.expect("SENT")
            assert (await comm.receive(timeout=5)).data == b"hello"
            listing = await loop.run_in_executor(
                None, peers_when, lambda found: found.peers_total == 1 and found.peers[0].messages_in == 1)
            peer = listing.peers[0]
            assert (peer.pid, peer.uid, peer.messages_in, peer.bytes_in) == (client.pid, os.getuid(), 1, 5)
            client.send("close")
            client.expect("CLOSED")
            assert (await comm.receive(timeout=5)).type is alpc.MessageType.PORT_CLOSED
            await loop.run_in_executor(None, peers_when, lambda found: found.peers_total == 0)
            stats = await loop.run_in_executor(None, lambda: alpc.port_stats("svc.aioinspect", config))
            totals = stats.ports[0].counters  # the connection's figures outlive it in the port's totals
            assert totals.messages_in == 1 and totals.disconnects == 1
        finally:
            await port.close()

    asyncio.run(main())


SECTION_PEERS = Path(__file__).resolve().parent / "section_peers.py"


def test_peers_show_section_bytes_lent_and_held_both_ways(broker: alpc.Broker, config: alpc.Config,
                                                          runtime_dir: Path, spawn) -> None:
    """A view the server holds counts on its side; so does a reply view the client has not released."""
    server = spawn.argv([sys.executable, str(SECTION_PEERS), "server", "svc.sections", "--runtime-dir",
                         str(runtime_dir), "--hold-views", "--report-interval", "0.05"])
    server.expect("READY")

    def section_bytes() -> int:
        listing = json.loads(run(runtime_dir, "peers", "svc.sections", "--json").stdout)
        (mine,) = [p for p in listing["peers"] if p["pid"] == os.getpid()]
        return int(mine["section_bytes"])

    with alpc.connect("svc.sections", config=config, timeout=5) as comm:
        server.expect("ACCEPTED")
        assert eventually(section_bytes, lambda n: n == 0) == 0
        view = comm.create_view(100_000, timeout=5)
        view.memory[:] = b"v" * 100_000
        assert comm.request(view, timeout=5).data.startswith(b"view:")
        assert server.expect("HOLDING") == ["1"]
        # The server holds our view: 100000 bytes of our section, held on its side.
        eventually(section_bytes, lambda n: n == 100_000)
        server.send("release")
        server.expect("RELEASED")
        eventually(section_bytes, lambda n: n == 0)
        reply = comm.request(b"cmd:view:300000", timeout=5)
        assert reply.view is not None
        # Now the server lends: its reply view stays ours until we release it.
        eventually(section_bytes, lambda n: n == 300_000)
        reply.view.release()
        comm.request(b"anything", timeout=5)  # carries the release back
        eventually(section_bytes, lambda n: n == 0)


def test_peers_show_a_large_message_until_its_body_is_taken(broker: alpc.Broker, config: alpc.Config,
                                                             spawn) -> None:
    """A body that came through a section ties up the client's section until the server reads it."""
    with alpc.create_port("svc.large", config=config, report_interval=0.05) as port:
        client = spawn("client", "svc.large")
        comm = port.listen(timeout=10).accept()
        client.expect("READY")
        size = EAGER_COPY_MAX + 1  # waits in the section until read (smaller bodies are copied on arrival)
        client.send("send " + "L" * size)
        client.expect("SENT")
        message = comm.receive(timeout=5)
        peer = eventually(only_peer(config, "svc.large"), lambda p: p is not None and p.section_bytes > 0)
        assert peer is not None and peer.section_bytes == size
        assert message.data == b"L" * size  # copied out: the range goes back
        eventually(only_peer(config, "svc.large"), lambda p: p is not None and p.section_bytes == 0)
        comm.close()


def _garbage_client(config: alpc.Config, name: str) -> None:
    hostile = alpc.connect(name, config=config, timeout=5)
    hostile._stream.send([b"\xde\xad\xbe\xef" * 20])
    hostile.close()


def test_stats_count_traffic_errors_refusals_and_latency(broker: alpc.Broker, config: alpc.Config,
                                                         runtime_dir: Path) -> None:
    attributes = alpc.PortAttributes(max_connect_data=100)
    with alpc.create_port("svc.counted", attributes, config=config, report_interval=0.05) as port:
        results: dict[str, object] = {}

        def clients() -> None:
            with alpc.connect("svc.counted", config=config, timeout=5) as comm:
                results["replies"] = [comm.request(b"x" * size, timeout=5).data for size in (1, 10, 100)]
                comm.send(b"datagram")
            with pytest.raises(alpc.ConnectionRejected):
                alpc.connect("svc.counted", b"please", config=config, timeout=5)
            with pytest.raises(alpc.MessageTooLarge):
                alpc.connect("svc.counted", b"y" * 200, config=config, timeout=5)
            _garbage_client(config, "svc.counted")
            results["done"] = True

        thread = threading.Thread(target=clients)
        thread.start()
        notices = 0
        while notices < 2:
            event = port.wait(timeout=10)
            if isinstance(event, alpc.ConnectionRequest):
                event.reject("no") if event.data == b"please" else event.accept()
            elif event.type is MessageType.REQUEST:
                event.reply(event.data.upper())
            elif event.type in (MessageType.PORT_CLOSED, MessageType.CLIENT_DIED):
                notices += 1
        thread.join(10)
        assert results["done"] and results["replies"] == [b"X", b"X" * 10, b"X" * 100]

        def fetch() -> control.PortStats:
            return alpc.port_stats("svc.counted", config).ports[0]

        stats = eventually(fetch, lambda s: s.counters.disconnects == 2)
        c = stats.counters
        assert (c.connects_accepted, c.connects_rejected, c.disconnects) == (2, 1, 2)
        assert (c.messages_in, c.messages_out) == (4, 3)
        assert (c.bytes_in, c.bytes_out) == (111 + 8, 111)
        assert c.errors == 1  # the garbage
        assert sum(c.latency_us) == 3
        assert stats.connects_forwarded == 3 and stats.connects_refused == 1 and stats.quota_refusals == 0
        assert stats.pid == os.getpid() and stats.connections == 0
        everything = alpc.port_stats(config=config)
        assert [p.name for p in everything.ports] == ["svc.counted"]
        assert everything.protocol_errors == 0  # the garbage went to the server, not the broker
        table = run(runtime_dir, "stats", "svc.counted")
        assert table.returncode == 0, table.stderr
        assert "svc.counted" in table.stdout and "request service time" in table.stdout
        as_json = json.loads(run(runtime_dir, "stats", "--json").stdout)
        assert as_json["ports"][0]["counters"]["messages_in"] == 4


def test_quota_refusals_are_counted_per_port_and_logged_once(broker: alpc.Broker, config: alpc.Config,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """max_pending_connects bounds connects the broker holds for a server that is not reading."""
    attributes = alpc.PortAttributes(max_pending_connects=2)
    with alpc.create_port("svc.swamped", attributes, config=config) as port, \
            caplog.at_level(logging.INFO, "alpc.broker"):
        clients = []
        try:
            for number in range(16):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(sock)
                sock.connect(str(config.broker_socket))
                body = control.Connect(name="svc.swamped", data=b"%02d" % number + b"." * 60_000,
                                       max_message_length=1 << 20, max_section_bytes=1 << 20)
                sock.sendall(encode_frame(MessageType.CONNECT, control.encode_body(body)))
            stats = eventually(lambda: alpc.port_stats("svc.swamped", config).ports[0],
                               lambda s: s.connects_forwarded + s.quota_refusals == 16)
            assert stats.quota_refusals >= 1 and stats.connects_refused == stats.quota_refusals
            refused = 0
            for sock in clients:
                sock.setblocking(False)
                try:
                    header = sock.recv(40)
                except BlockingIOError:
                    continue  # forwarded to the server, which has not answered
                refused += header[3] == MessageType.ERROR
            assert refused == stats.quota_refusals
            assert port.registered
            logged = [r for r in caplog.records if "max_pending_connects" in r.getMessage()]
            assert len(logged) == 1 and logged[0].port == "svc.swamped"  # type: ignore[attr-defined]
        finally:
            for sock in clients:
                sock.close()


def test_quota_refusals_count_the_servers_max_connections_too(broker: alpc.Broker, config: alpc.Config,
                                                              runtime_dir: Path, spawn) -> None:
    server = spawn("server", "svc.full", "--max-connections", "1")
    server.expect("READY")
    with alpc.connect("svc.full", config=config, timeout=5) as first:
        server.expect("ACCEPTED")
        for _ in range(2):
            with pytest.raises(alpc.QuotaExceeded) as refused:
                alpc.connect("svc.full", config=config, timeout=5)
            assert refused.value.limit == "max_connections"
        assert first.request(b"still", timeout=5).data == b"STILL"
    stats = eventually(lambda: alpc.port_stats("svc.full", config).ports[0],
                       lambda s: s.counters.quota_refusals == 2)
    assert stats.quota_refusals == 2 and stats.counters.connects_rejected == 2
    assert stats.connects_refused == 0  # the broker forwarded all three: the server refused
    table = run(runtime_dir, "stats", "svc.full").stdout.splitlines()
    header = next(line for line in table if line.startswith("NAME"))
    row = next(line for line in table if line.startswith("svc.full"))
    column = header.index("QUOTA")  # right-aligned in a column as wide as its title
    assert row[column:column + len("QUOTA")].strip() == "2"


def test_watch_refreshes_and_survives_a_missing_broker(broker: alpc.Broker, config: alpc.Config,
                                                       runtime_dir: Path, tmp_path: Path) -> None:
    with alpc.create_port("svc.watched", config=config):
        result = run(runtime_dir, "stats", "--watch", "--interval", "0.05", "--count", "3")
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("--- ") == 3 and result.stdout.count("svc.watched") == 3
        result = run(runtime_dir, "peers", "svc.watched", "--watch", "--interval", "0.05", "--count", "2")
        assert result.stdout.count("port svc.watched") == 2
    empty = tmp_path / "nobroker"
    empty.mkdir(mode=0o700)
    result = run(empty, "ports", "--watch", "--interval", "0.05", "--count", "2")
    assert result.returncode == 0 and result.stdout.count("broker unavailable") == 2


def test_unknown_port_and_bad_names(broker: alpc.Broker, config: alpc.Config, runtime_dir: Path) -> None:
    with pytest.raises(alpc.PortNotFound):
        alpc.list_peers("svc.ghost", config)
    with pytest.raises(alpc.PortNotFound):
        alpc.port_stats("svc.ghost", config)
    with pytest.raises(alpc.InvalidName):
        alpc.list_peers("bad name", config)
    result = run(runtime_dir, "peers", "svc.ghost")
    assert result.returncode == 1 and "PortNotFound" in result.stderr


def test_inspection_follows_the_port_acl() -> None:
    owner = 1000

    def sees(viewer: PeerCred, acl: PortAcl, groups: tuple[int, ...] = ()) -> bool:
        return may_inspect(viewer, groups, owner, acl).allowed

    private = PortAcl()
    assert sees(PeerCred(11, owner, 5), private)
    assert sees(PeerCred(12, 0, 0), private)  # root, though the ACL does not let root connect
    assert not sees(PeerCred(13, 1001, 1000), private)  # the owner's group is not enough
    by_uid, by_gid = PortAcl(allow_uids=frozenset({1001})), PortAcl(allow_gids=frozenset({77}))
    assert sees(PeerCred(13, 1001, 1001), by_uid) and not sees(PeerCred(14, 1002, 1002), by_uid)
    assert sees(PeerCred(14, 1002, 77), by_gid)  # primary group
    assert sees(PeerCred(14, 1002, 1002), by_gid, groups=(5, 77))  # supplementary group
    assert not sees(PeerCred(14, 1002, 1002), by_gid, groups=(5,))
    denied = PortAcl(allow_everyone=True, deny_uids=frozenset({1001, owner}), deny_gids=frozenset({66}))
    assert sees(PeerCred(15, 1003, 1003), denied)
    assert not sees(PeerCred(16, 1001, 1001), denied)  # a deny wins over allow_everyone
    assert not sees(PeerCred(17, 1003, 1003), denied, groups=(66,))
    assert sees(PeerCred(18, owner, owner), denied)  # the owner always sees its own port
    assert "not in the ACL" in may_inspect(PeerCred(19, 1004, 1004), (), owner, private).reason
    assert may_see_settings(PeerCred(1, owner, 1), owner) and may_see_settings(PeerCred(1, 0, 0), owner)
    assert not may_see_settings(PeerCred(1, 1001, 1001), owner)


NOBODY = 65534
GROUP = 4242


def _as_nobody(runtime_dir: Path, *args: str, groups: str = "") -> subprocess.CompletedProcess[str]:
    options = ["--groups", groups] if groups else []
    return subprocess.run([sys.executable, str(OPS), "as-uid", str(NOBODY), *options, "--", "--runtime-dir",
                           str(runtime_dir), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a viewer as another uid")
def test_another_uid_inspects_only_the_ports_whose_acl_admits_it(spawn, runtime_dir: Path,
                                                                  config: alpc.Config) -> None:
    """A shared broker: uid 65534 sees a port its uid or group may connect to, and nothing of the others."""
    acls = {"svc.private": alpc.PortAcl(), "svc.for-nobody": alpc.PortAcl(allow_uids=frozenset({NOBODY})),
            "svc.for-group": alpc.PortAcl(allow_gids=frozenset({GROUP}))}
    with alpc.Broker(runtime_dir, shared=True), contextlib.ExitStack() as stack:
        clients = {}
        for name, acl in acls.items():
            port = stack.enter_context(alpc.create_port(name, alpc.PortAttributes(acl=acl), config=config,
                                                        report_interval=0.05))
            clients[name] = spawn("client", name)
            stack.enter_context(port.listen(timeout=10).accept())
            clients[name].expect("READY")
            eventually(lambda n=name: alpc.list_peers(n, config).peers_total, lambda n: n == 1)

        listed = json.loads(_as_nobody(runtime_dir, "ports", "--json").stdout)
        assert [(p["name"], p["details"], [c["pid"] for c in p["clients"]]) for p in listed] == [
            ("svc.for-nobody", True, [clients["svc.for-nobody"].pid])]
        # Admitted as a client, not as an administrator: the ACL and the owner's usage stay hidden.
        assert listed[0]["acl"]["allow_uids"] == [] and listed[0]["owner_quota"]["connections"] == -1
        peers = json.loads(_as_nobody(runtime_dir, "peers", "svc.for-nobody", "--json").stdout)
        assert [p["pid"] for p in peers["peers"]] == [clients["svc.for-nobody"].pid]
        assert [p["name"] for p in json.loads(_as_nobody(runtime_dir, "stats", "--json").stdout)["ports"]] == [
            "svc.for-nobody"]
        for args in (("peers", "svc.private"), ("stats", "svc.private"), ("peers", "svc.for-group")):
            denied = _as_nobody(runtime_dir, *args)
            assert denied.returncode == 1 and "AccessDenied" in denied.stderr, denied.stderr
            assert f"may not inspect port '{args[1]}': uid {NOBODY} is not in the ACL" in denied.stderr

        # With the group among its supplementary groups (SO_PEERGROUPS), the group's port shows too.
        listed = json.loads(_as_nobody(runtime_dir, "ports", "--json", groups=str(GROUP)).stdout)
        assert [p["name"] for p in listed] == ["svc.for-group", "svc.for-nobody"]
        grouped = _as_nobody(runtime_dir, "peers", "svc.for-group", groups=str(GROUP))
        assert grouped.returncode == 0 and str(clients["svc.for-group"].pid) in grouped.stdout
        stats = json.loads(_as_nobody(runtime_dir, "stats", "svc.for-group", "--json", groups=str(GROUP)).stdout)
        assert stats["ports"][0]["connections"] == 1
        # root sees every port, with its ACL.
        assert [(p.name, p.acl.allow_uids) for p in alpc.list_ports(config)] == [
            ("svc.for-group", ()), ("svc.for-nobody", (NOBODY,)), ("svc.private", ())]


def test_connection_stats_and_histogram_buckets() -> None:
    assert [latency_bucket(s) for s in (0, 0.5e-6, 1e-6, 1.5e-6, 3e-6, 1e-3, 1e6)] == [0, 0, 1, 1, 2, 10, 25]
    stats = ConnectionStats()
    stats.in_flight[7] = time.monotonic()  # as Connection.route files request 7
    stats.replied(7, 4)
    assert (stats.messages_out, stats.bytes_out, stats.in_flight, sum(stats.latency)) == (1, 4, {}, 1)
    stats.replied(99, 1)  # not a request we saw: counted, no latency
    assert sum(stats.latency) == 1
    assert latency_percentile((0,) * 26, 0.5) is None
    histogram = tuple([0, 0, 0, 98, 1, 0, 1] + [0] * 19)
    assert latency_percentile(histogram, 0.5) == 8.0
    assert latency_percentile(histogram, 0.99) == 16.0
    assert latency_percentile(histogram, 1.0) == 64.0

"""Security features between real processes: handles both ways, identity and pidfds per
message, limits shown by `alpc ports --json` and `alpc stats --json`.

The hostile side of each (refused kinds, floods, outsiders, setuid) is in tests/hostile/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import alpc
from alpc import qlpc

ROOT = Path(__file__).resolve().parent.parent
HOSTILE_PEERS = ROOT / "tests" / "hostile" / "hostile_peers.py"


@pytest.fixture
def role(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    def start(kind: str, name: str, *options: str):  # type: ignore[no-untyped-def]
        return spawn.argv([sys.executable, str(HOSTILE_PEERS), kind, name, "--runtime-dir", str(runtime_dir),
                           *options])
    return start


def pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to, from the kernel's fdinfo."""
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AssertionError("not a pidfd")


def test_handles_pass_to_a_server_that_takes_their_kind(broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.handles", "--kinds", "pipe,memfd,socket")
    server.expect("READY")
    client = role("client", "svc.handles")
    client.expect("READY")
    server.expect("ACCEPTED")
    server.send("fds")
    baseline = int(server.expect("FDS")[0])
    for kind in ("pipe", "memfd", "socket"):
        client.send(f"sendfd {kind}")
        client.expect("SENT")
        line = server.expect("DATAGRAM")
        assert f"fds={kind}" in line and "refused=-" in line, line
    client.send("sendfd directory")  # not a kind the server announced: refused before sending
    error = client.expect("ERROR")
    assert error[0] == "HandleNotAllowed" and "is_a_directory" in error[2]
    server.send("fds")
    assert int(server.expect("FDS")[0]) == baseline  # the server closed what it took


def test_a_server_passes_an_fd_back_in_its_reply(broker: alpc.Broker, runtime_dir: Path, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.giver", "--kinds", "memfd")
    server.expect("READY")
    config = alpc.Config(runtime_dir=runtime_dir, handle_kinds={"memfd"}, max_handles_per_message=1)
    with alpc.connect("svc.giver", config=config, timeout=5) as comm:
        reply = comm.request(b"fd:memfd", timeout=5)
        assert [handle.kind for handle in reply.handles] == [alpc.HandleKind.MEMFD]
        (handle,) = reply.take_handles()
        try:
            assert os.pread(handle.fd, 64, 0) == b"written by the server"
        finally:
            os.close(handle.fd)


def test_a_client_that_takes_no_fds_gets_none(broker: alpc.Broker, config: alpc.Config, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.giver2", "--kinds", "memfd")
    server.expect("READY")
    with alpc.connect("svc.giver2", config=config, timeout=5) as comm:
        comm.request(b"echo:warm", timeout=5)
        # The server's runtime knows (from the handshake) that this client takes no fds.
        assert comm.request(b"fd:memfd", timeout=5).data == b"refused"
    assert server.expect("UNANSWERED")[1] == "HandleNotAllowed"


def test_each_message_names_its_sender_and_offers_its_pidfd(broker: alpc.Broker, config: alpc.Config, role) -> None:  # type: ignore[no-untyped-def]
    with alpc.create_port("svc.ident", config=config) as port:
        client = role("client", "svc.ident")
        comm = port.listen(timeout=10).accept()
        ready = client.expect("READY")
        client_pid = int(ready[0])
        client.send("send hello")
        message = comm.receive(timeout=10)
        assert message.sender == alpc.PeerCred(client_pid, os.getuid(), os.getgid())
        assert not message.identity_changed
        assert message.pidfd is not None and pidfd_pid(message.pidfd) == client_pid
        comm.close()


def test_the_client_holds_a_kernel_pidfd_of_its_server(broker: alpc.Broker, config: alpc.Config, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.pidfd")
    server_pid = int(server.expect("READY")[0])
    with alpc.connect("svc.pidfd", config=config, timeout=5, server_uid=os.getuid()) as comm:
        assert comm.peer_pidfd is not None and pidfd_pid(comm.peer_pidfd) == server_pid
        reply = comm.request(b"echo:x", timeout=5)
        assert reply.sender.pid == server_pid and reply.pidfd == comm.peer_pidfd


def cli(runtime_dir: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    return done.stdout


def test_every_limit_is_visible_in_ports_and_stats(runtime_dir: Path, config: alpc.Config) -> None:
    limits = alpc.BrokerLimits(max_connections_per_uid=77, max_ports_per_uid=5)
    attributes = alpc.PortAttributes(max_connections=9, max_pending_requests=8, max_queued_datagrams=7,
                                     handle_kinds={"pipe", "file"}, max_handles_per_message=3, max_inflight_handles=6,
                                     send_timeout=2.5, refuse_identity_change=True,
                                     acl=alpc.PortAcl(allow_gids={4242}, allow_root=True))
    with alpc.Broker(runtime_dir, shared=True, limits=limits), alpc.create_port("svc.limits", attributes,
                                                                                config=config):
        (port,) = json.loads(cli(runtime_dir, "ports", "--json"))
        assert port["limits"] == {
            "max_message_length": 1 << 30, "max_connect_data": 64 << 10, "max_pending_connects": 128,
            "max_connections": 9, "max_pending_requests": 8, "max_queued_datagrams": 7,
            "max_handles_per_message": 3, "max_inflight_handles": 6, "handle_kinds": ["file", "pipe"],
            "max_section_bytes": 2 << 30, "max_port_section_bytes": 8 << 30, "send_timeout_ms": 2500,
            "refuse_identity_change": True,
        }
        assert port["acl"]["allow_gids"] == [4242] and port["acl"]["allow_root"] is True
        assert port["owner_quota"] == {"max_connections_per_uid": 77, "max_ports_per_uid": 5, "connections": 2,
                                       "ports": 1}
        broker = json.loads(cli(runtime_dir, "stats", "--json"))["broker"]
        assert broker["shared"] is True
        assert (broker["max_connections_per_uid"], broker["max_ports_per_uid"]) == (77, 5)
        assert {"uid": os.getuid(), "connections": 2, "ports": 1} in broker["usage"]  # the port, and this query
        assert "per-uid quotas: 77 connections, 5 ports" in cli(runtime_dir, "stats")


def test_quick_lpc_rings_leave_fds_and_identity_to_the_socket(broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    if not qlpc.available():
        pytest.skip(qlpc.unavailable_reason() or "Quick-LPC unavailable")
    server = role("server", "svc.quickfd", "--quick", "--kinds", "pipe")
    server.expect("READY")
    client = role("client", "svc.quickfd")
    client.expect("READY")
    server.expect("ACCEPTED")
    client.send("request echo:ring")
    assert client.expect("REPLY") == ["RING"]
    assert "changed=False" in server.expect("REQUEST")
    client.send("requestfd pipe")  # a message with fds never takes the ring
    assert client.expect("REPLY") == ["WITH-FD", "quick=True"]
    assert "fds=pipe" in server.expect("REQUEST")
    with pytest.raises(ValueError, match="Quick-LPC"):
        alpc.PortAttributes(quick_lpc=True, refuse_identity_change=True)


def test_datagrams_taken_by_a_nested_callback_return_their_credit(broker: alpc.Broker, runtime_dir: Path,  # type: ignore[no-untyped-def]
                                                                  role) -> None:
    server = role("server", "svc.push")
    server.expect("READY")
    config = alpc.Config(runtime_dir=runtime_dir, max_queued_datagrams=2)
    taken: list[bytes] = []
    with alpc.connect("svc.push", config=config, timeout=5) as comm:
        # Ten datagrams through a window of two: each one handed to on_message frees its slot.
        reply = comm.request(b"push:10", timeout=10, on_message=lambda message: taken.append(message.data))
        assert reply.data == b"pushed" and taken == [b"pushed datagram"] * 10

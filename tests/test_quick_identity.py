"""Quick-LPC ring messages carry the kernel's word on who sent them, as socket messages do.

A ring entry becomes a Message with the peer process's credentials as the kernel tells them
(PIDFD_GET_INFO on the peer's pidfd) when it is taken, so a client that drops privileges after
connecting is seen as who it now is; a forked child (the privilege-separation pattern) has no
mapping of the rings to write through; and a peer that is gone cannot have its entries
attributed to anyone. Real processes throughout (tests/qlpc_peers.py)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

import alpc
from alpc import _native, qlpc
from alpc.protocol import QUICK_ID_BIT
from alpc.transport import deadline_after, wait_readable

QLPC_PEERS = Path(__file__).resolve().parent / "qlpc_peers.py"
NOBODY = 65534
RING_MEMFD = "/memfd:alpc-"  # the rings' memfd ("alpc-qlpc"; sections share the prefix)
native = pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
attesting = pytest.mark.skipif(not qlpc.attested(), reason=str(qlpc.unattested_reason()))
root = pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")


def start_peer(spawn, runtime_dir: Path, role: str, name: str, *options: str):  # type: ignore[no-untyped-def]
    return spawn.argv([sys.executable, str(QLPC_PEERS), role, name, "--runtime-dir", str(runtime_dir), *options])


def accept_one(port: alpc.ConnectionPort) -> tuple[threading.Thread, list[alpc.CommunicationPort]]:
    accepted: list[alpc.CommunicationPort] = []
    listener = threading.Thread(target=lambda: accepted.append(port.listen(timeout=10).accept()))
    listener.start()
    return listener, accepted


# A first ring request may ring the server's socket doorbell, and the next one then takes the
# socket until the server has read that: warm up until two requests in a row took the ring.
WARM_UP = 20


def region_lines(path: str) -> list[str]:
    """Every mapping of a ring region in a /proc/PID/maps."""
    with open(path) as maps:
        return [line for line in maps if RING_MEMFD in line]


def ring_lines(path: str) -> list[str]:
    """The mappings of the rings themselves: the C side maps each region from offset 0
    (Python maps only the bulk areas at its end, for views, at a page offset past the rings)."""
    return [line for line in region_lines(path) if int(line.split()[2], 16) == 0]


def bulk_lines(path: str) -> list[str]:
    return [line for line in region_lines(path) if int(line.split()[2], 16) != 0]


def fd_targets(pid: int | str) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass  # closed meanwhile (the listing's own fd)
    return targets


def test_attested_matches_the_mode() -> None:
    """The pure-Python build says no and why; the extension on a kernel with PIDFD_GET_INFO says yes."""
    assert qlpc.attested() == (qlpc.unattested_reason() is None)
    if _native.QUICK_UNAVAILABLE is not None:
        assert not qlpc.attested() and qlpc.unattested_reason() == _native.QUICK_UNAVAILABLE
        return
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    if (major, minor) >= (6, 13):
        assert qlpc.attested(), qlpc.unattested_reason()
    else:
        assert "PIDFD_GET_INFO" in str(qlpc.unattested_reason())


@native
@attesting
@root
def test_a_client_that_drops_privileges_is_seen_as_who_it_now_is(broker, config, spawn,  # type: ignore[no-untyped-def]
                                                                 runtime_dir) -> None:
    """The privilege-separation step on a connected client (setgroups, setgid, setuid): its
    next ring request has the new uid/gid as sender and identity_changed set, as a socket
    message would; before that, the connect identity and no change."""
    with alpc.create_port("qid.client", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        listener, accepted = accept_one(port)
        client = start_peer(spawn, runtime_dir, "client", "qid.client")
        pid, quick = client.expect("READY")
        listener.join(10)
        server = accepted[0]
        try:
            assert quick == "True" and server.quick
            assert (server.peer.pid, server.peer.uid, server.peer.gid) == (int(pid), 0, 0)
            in_a_row = 0
            for _ in range(WARM_UP):
                client.send("request before")
                message = server.receive(timeout=10)
                message.reply(b"ok")
                client.expect("MESSAGE")
                in_a_row = in_a_row + 1 if message.id & QUICK_ID_BIT else 0
                if in_a_row == 2:
                    break
            assert message.data == b"before" and message.id & QUICK_ID_BIT
            assert message.sender == server.peer and not message.identity_changed

            client.send("drop")
            assert client.expect("DROPPED") == [str(NOBODY), str(NOBODY)]
            taken = server._quick.ring.counts()["messages_in"]  # type: ignore[union-attr]
            client.send("request after")
            message = server.receive(timeout=10)
            assert message.data == b"after" and message.id & QUICK_ID_BIT
            assert server._quick.ring.counts()["messages_in"] == taken + 1  # type: ignore[union-attr]
            assert (message.sender.pid, message.sender.uid, message.sender.gid) == (int(pid), NOBODY, NOBODY)
            assert message.identity_changed
            assert server.peer.uid == 0  # the connection's identity stays what the kernel said at connect
            message.reply(b"ok")
            client.expect("MESSAGE")
        finally:
            server.close()


@native
@attesting
@root
def test_a_ring_reply_carries_the_servers_current_credentials(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    """request() over the rings: the reply's sender is the server process as the kernel sees
    it now, so a server that dropped privileges before answering is seen as who it now is."""
    server = start_peer(spawn, runtime_dir, "server", "qid.server", "--mode", "receive")
    server_pid = int(server.expect("READY")[0])
    with alpc.connect("qid.server", config=config, timeout=10) as comm:
        assert comm.quick
        in_a_row = 0
        for _ in range(WARM_UP):
            reply = comm.request(b"hello", timeout=10)
            in_a_row = in_a_row + 1 if reply.callback_id & QUICK_ID_BIT else 0
            if in_a_row == 2:
                break
        assert reply.data == b"HELLO" and reply.callback_id & QUICK_ID_BIT
        assert (reply.sender.pid, reply.sender.uid, reply.sender.gid) == (server_pid, 0, 0)
        assert not reply.identity_changed
        taken = comm._quick.ring.counts()["messages_in"]  # type: ignore[union-attr]
        reply = comm.request(b"drop", timeout=10)
        assert reply.data == b"DROPPED" and reply.callback_id & QUICK_ID_BIT
        assert comm._quick.ring.counts()["messages_in"] == taken + 1  # type: ignore[union-attr]
        assert (reply.sender.pid, reply.sender.uid, reply.sender.gid) == (server_pid, NOBODY, NOBODY)
        assert reply.identity_changed


@native
def test_a_forked_child_has_no_mapping_of_the_rings(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    """The rings are MADV_DONTFORK: a child forked after connecting cannot write ring entries
    that would pass for its parent's. It closes its copy of the port without touching the
    (absent) rings, and the parent keeps using them. (It inherits the bulk areas' mappings,
    bodies only, as it inherits sections.)"""
    server = start_peer(spawn, runtime_dir, "server", "qid.fork")
    server.expect("READY")
    with alpc.connect("qid.fork", config=config, timeout=10) as comm:
        assert comm.quick and comm.call(b"before") == b"BEFORE"
        assert ring_lines("/proc/self/maps"), "the parent maps its rings"
        child = os.fork()
        if child == 0:
            code = 3 if ring_lines("/proc/self/maps") else 0
            try:
                comm.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child had the rings mapped, or crashed closing them"
        sent = comm._quick.ring.counts()["messages_out"]  # type: ignore[union-attr]
        for i in range(5):
            assert comm.call(f"after{i}".encode()) == f"AFTER{i}".encode()
        assert comm._quick.ring.counts()["messages_out"] == sent + 5  # type: ignore[union-attr]


def forked_child_sees_rings() -> bool:
    """Fork as another thread of a server might: does the child find a ring mapping?"""
    child = os.fork()
    if child == 0:
        os._exit(3 if ring_lines("/proc/self/maps") else 0)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) != 0


@native
def test_a_child_forked_while_the_server_sets_up_the_rings_has_no_mapping(
        broker, config, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The server's rings are never mapped but by the C side (MADV_DONTFORK): a fork by another
    thread while a connection is accepted, before or after the C side maps them, leaves the
    child nothing to write through (a Python mapping of the memfd in between did)."""
    seen: list[tuple[str, bool]] = []
    original = qlpc.QuickRing

    def watched(*args: object, **kwargs: object) -> object:
        if kwargs["server"]:
            seen.append(("before", forked_child_sees_rings()))
        ring = original(*args, **kwargs)  # type: ignore[arg-type]
        if kwargs["server"]:
            seen.append(("after", forked_child_sees_rings()))
        return ring

    monkeypatch.setattr(qlpc, "QuickRing", watched)
    with alpc.create_port("qid.setup", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        listener, accepted = accept_one(port)
        with alpc.connect("qid.setup", config=config, timeout=10) as comm:
            listener.join(10)
            accepted[0].close()
            assert comm.quick
    assert seen == [("before", False), ("after", False)]


@native
def test_no_side_keeps_the_ring_memfd_open(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    """Each side maps the rings once (the bulk areas again only once views use them, see
    test_qlpc_views.py) and holds no fd of their memfd (one would let a forked child map
    them again)."""
    server = start_peer(spawn, runtime_dir, "server", "qid.fds")
    server_pid = server.expect("READY")[0]
    with alpc.connect("qid.fds", config=config, timeout=10) as comm:
        assert comm.quick and comm.call(b"x") == b"X"
        server.expect("ACCEPTED")
        for pid in ("self", server_pid):
            assert [line.split()[-2] for line in ring_lines(f"/proc/{pid}/maps")] == ["/memfd:alpc-qlpc"]
            assert bulk_lines(f"/proc/{pid}/maps") == []  # (mapped again for views, on first use)
            assert not [target for target in fd_targets(pid) if target.startswith(RING_MEMFD)]


@native
@attesting
def test_a_ring_request_of_a_reaped_client_is_not_handed_out(broker, config, spawn, runtime_dir) -> None:  # type: ignore[no-untyped-def]
    """The kernel cannot say who a reaped process was: its ring request is not given out under
    the connection's identity; the server learns of the death as on the socket path."""
    with alpc.create_port("qid.dead", alpc.PortAttributes(quick_lpc=True), config=config) as port:
        listener, accepted = accept_one(port)
        client = start_peer(spawn, runtime_dir, "client", "qid.dead")
        client.expect("READY")
        listener.join(10)
        server = accepted[0]
        try:
            assert server.quick
            client.send("hang")
            client.expect("HANGING")
            # The server has not waited on its ring yet: the client's post rings the socket
            # doorbell, written after the entry.
            assert wait_readable([server.fileno()], deadline_after(10))
            client.kill()  # SIGKILL, then reaped: its pidfd names no process any more
            message = server.receive(timeout=10)
            assert message.type is alpc.MessageType.CLIENT_DIED, (message.type, message.data)
        finally:
            server.close()

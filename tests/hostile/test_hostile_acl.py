"""Port ACLs and server pinning with real processes of another uid (the tests run as root;
peers drop to uid 65534 after their imports).

- A private broker (0700 dir, 0600 socket) cannot even be reached by another uid.
- A shared broker (0755, 0666) lets every uid reach it; each port's ACL, checked by the
  broker against the kernel's credentials (SO_PEERCRED, SO_PEERGROUPS), keeps them out,
  and the server's own runtime checks again: the application never hears of a refusal.
- A client pinning the server's uid is refused a port of anyone else, by the broker and,
  should the broker lie, by its own check of the server reply's SCM_CREDENTIALS.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

import alpc
from alpc import control
from alpc.config import ensure_runtime_dir
from alpc.exchange import control_frame
from alpc.transport import Listener, wait_readable
from alpc.wire import FrameDecoder, FrameLimits, MessageType

NOBODY = 65534
GROUP = 4242


def test_a_private_broker_is_out_of_reach_of_other_uids(broker: alpc.Broker, runtime_dir: Path, role) -> None:  # type: ignore[no-untyped-def]
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(broker.socket_path.stat().st_mode) == 0o600
    server = role("server", "svc.private", "--everyone")
    server.expect("READY")
    outsider = role("client", "svc.private", "--as-user", str(NOBODY))
    refused = outsider.expect("REFUSED")
    assert refused[0] == "AccessDenied" and "not_allowed_to_reach_the_broker" in refused[2]


def test_a_shared_broker_is_reachable_but_the_acl_refuses(shared_broker: alpc.Broker, runtime_dir: Path,  # type: ignore[no-untyped-def]
                                                         config: alpc.Config, role) -> None:
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE(shared_broker.socket_path.stat().st_mode) == 0o666
    server = role("server", "svc.mine")  # default ACL: the owner's uid (root) only
    server.expect("READY")
    outsider = role("client", "svc.mine", "--as-user", str(NOBODY))
    refused = outsider.expect("REFUSED")
    assert refused[0] == "AccessDenied" and f"uid_{NOBODY}_is_not_in_the_ACL" in refused[2], refused
    # The server never heard of it: the first connect it sees is the honest one.
    with alpc.connect("svc.mine", config=config, timeout=5) as honest:
        assert server.expect("ACCEPTED")[0] == str(os.getpid())
        assert honest.request(b"echo:served", timeout=5).data == b"SERVED"
    stats = alpc.port_stats("svc.mine", config)
    assert stats.broker.refused_acl == 1 and stats.ports[0].connects_refused == 1


def test_supplementary_groups_are_read_from_the_kernel(shared_broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.group", "--allow-gid", str(GROUP))
    server.expect("READY")
    member = role("client", "svc.group", "--as-user", str(NOBODY), "--groups", f"7,{GROUP}")
    assert member.expect("READY")
    accepted = server.expect("ACCEPTED")
    assert accepted[1:] == [str(NOBODY), f"7,{GROUP}"]
    member.send("request echo:member")
    assert member.expect("REPLY") == ["MEMBER"]
    stranger = role("client", "svc.group", "--as-user", str(NOBODY), "--groups", "7")
    assert stranger.expect("REFUSED")[0] == "AccessDenied"


def test_the_client_sees_the_servers_uid_and_gid(shared_broker: alpc.Broker, config: alpc.Config, role) -> None:  # type: ignore[no-untyped-def]
    """Kernel-verified, on the connection and on every reply: a server of uid 65534, gid 4243."""
    server = role("server", "svc.whois", "--allow-root", "--as-user", str(NOBODY), "--as-group", str(GROUP + 1))
    server_pid = int(server.expect("READY")[0])
    with alpc.connect("svc.whois", config=config, timeout=5) as comm:
        assert comm.server == alpc.PeerCred(server_pid, NOBODY, GROUP + 1)
        reply = comm.request(b"echo:who", timeout=5)
        assert reply.sender == alpc.PeerCred(server_pid, NOBODY, GROUP + 1)
    # The server's side of the same connection saw root.
    assert server.expect("ACCEPTED")[:2] == [str(os.getpid()), "0"]


def test_deny_wins_over_allow(shared_broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.deny", "--everyone", "--deny-gid", str(GROUP))
    server.expect("READY")
    denied = role("client", "svc.deny", "--as-user", str(NOBODY), "--groups", str(GROUP))
    assert f"group_{GROUP}_is_denied" in denied.expect("REFUSED")[2]
    allowed = role("client", "svc.deny", "--as-user", str(NOBODY))
    assert allowed.expect("READY")


def test_the_servers_runtime_refuses_what_an_erring_broker_let_through(
        shared_broker: alpc.Broker, config: alpc.Config, role, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # Register the port with an ACL that admits everyone, while the port itself admits only its owner.
    monkeypatch.setattr(control.AclSpec, "of", classmethod(lambda cls, acl: cls(allow_everyone=True)))
    with alpc.create_port("svc.double", config=config) as port:
        heard: list[alpc.ConnectionRequest] = []
        listener = threading.Thread(target=lambda: heard.append(port.listen(timeout=30)))
        listener.start()
        outsider = role("client", "svc.double", "--as-user", str(NOBODY))
        refused = outsider.expect("REFUSED")
        assert refused[0] == "AccessDenied" and "is_not_in_the_ACL" in refused[2]
        honest: list[alpc.CommunicationPort] = []
        connector = threading.Thread(target=lambda: honest.append(alpc.connect("svc.double", config=config,
                                                                                timeout=10)))
        connector.start()
        listener.join(10)
        # The first request the application hears of is the honest one.
        assert [request.client.pid for request in heard] == [os.getpid()]
        served = heard[0].accept()
        connector.join(10)
        honest[0].close()
        served.close()


def test_a_shared_runtime_dir_others_may_write_to_is_refused(tmp_path: Path) -> None:
    writable = tmp_path / "alpc"
    writable.mkdir()
    os.chmod(writable, 0o775)
    with pytest.raises(alpc.AccessDenied, match="writable by others"):
        ensure_runtime_dir(writable, shared=True)
    os.chmod(writable, 0o755)
    assert ensure_runtime_dir(writable, shared=True) == writable
    with pytest.raises(alpc.AccessDenied, match="--shared"):
        ensure_runtime_dir(writable)


# -- server identity pinning ---------------------------------------------------------------


def test_a_pinned_server_uid_refuses_a_port_of_anyone_else(shared_broker: alpc.Broker, config: alpc.Config,  # type: ignore[no-untyped-def]
                                                           role) -> None:
    squatter = role("server", "svc.bank", "--as-user", str(NOBODY), "--everyone")
    squatter.expect("READY")
    with pytest.raises(alpc.AccessDenied, match=f"owned by uid {NOBODY}, not the required uid 0"):
        alpc.connect("svc.bank", config=config, timeout=5, server_uid=0)
    with alpc.connect("svc.bank", config=config, timeout=5, server_uid=NOBODY) as comm:
        assert comm.server.uid == NOBODY
        assert squatter.expect("ACCEPTED")[0] == str(os.getpid())  # the refused connect never reached it


def test_the_client_checks_the_servers_credentials_itself(runtime_dir: Path, role) -> None:  # type: ignore[no-untyped-def]
    """A lying broker: it answers the connect itself (as root) for a port pinned to uid 65534."""
    ensure_runtime_dir(runtime_dir)
    listener = Listener.bind(runtime_dir / "broker.sock")
    try:
        client = role("client", "svc.pinned", "--server-uid", str(NOBODY))
        assert wait_readable([listener.fileno()], None)
        stream = listener.accept()
        assert stream is not None
        decoder = FrameDecoder(FrameLimits(allowed_types=frozenset({MessageType.CONNECT}), max_data=1 << 20))
        frames: list[object] = []
        while not frames:
            assert wait_readable([stream.fileno()], None)
            data = stream.recv()
            assert data
            frames = decoder.feed(data)
        reply = control.ConnectionReply(accepted=True, data=b"", reason="", max_message_length=1 << 20)
        stream.send(control_frame(reply))
        refused = client.expect("REFUSED")
        assert refused[0] == "AccessDenied" and f"runs_as_uid_0,_not_the_required_uid_{NOBODY}" in refused[2]
        stream.close()
    finally:
        listener.close()

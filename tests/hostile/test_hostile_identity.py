"""A client whose identity changes after connect (setuid): every message carries the
kernel's SCM_CREDENTIALS, so the server sees the change, and a port can refuse it."""

from __future__ import annotations

import alpc

NOBODY = 65534


def test_a_setuid_after_connect_is_flagged_on_each_message(broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.who")
    server.expect("READY")
    client = role("client", "svc.who")
    client.expect("READY")
    server.expect("ACCEPTED")
    client.send("send before")
    assert server.expect("DATAGRAM")[1:3] == ["0", "changed=False"]
    client.send(f"setuid {NOBODY}")
    client.expect("SETUID")
    client.send("send after")
    assert server.expect("DATAGRAM")[1:3] == [str(NOBODY), "changed=True"]
    client.send("request echo:still")
    assert client.expect("REPLY") == ["STILL"]


def test_a_port_can_refuse_a_changed_identity(broker: alpc.Broker, config: alpc.Config, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.strict", "--refuse-identity-change")
    server.expect("READY")
    with alpc.connect("svc.strict", config=config, timeout=5) as honest:
        server.expect("ACCEPTED")
        client = role("client", "svc.strict")
        client.expect("READY")
        server.expect("ACCEPTED")
        client.send(f"setuid {NOBODY}")
        client.expect("SETUID")
        client.send("send after")
        assert "identity_changed" in server.expect("CLIENT_DIED")[1]
        client.send("request echo:refused")
        assert client.expect("ERROR")[0] == "PeerGone"
        assert honest.request(b"echo:fine", timeout=5).data == b"FINE"

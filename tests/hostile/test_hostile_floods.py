"""Floods: connects, ports, requests, datagrams, and a client that stops reading.

Exhaustion slows or refuses the offender (typed errors naming the limit); it never
kills anyone else's connection, and room for replies and death notices stays reserved.
"""

from __future__ import annotations

import os

import pytest

import alpc
from alpc.quotas import Limit
from alpc.wire import MessageType, encode_frame

NOBODY = 65534


def test_a_connect_flood_is_capped_per_uid(small_broker: alpc.Broker, config: alpc.Config, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.open", "--everyone")
    server.expect("READY")
    hog = role("hog", "-", "--as-user", str(NOBODY), "--count", "20")
    assert hog.expect("REFUSED") == ["8", Limit.MAX_CONNECTIONS_PER_UID]
    assert hog.expect("HELD") == ["8"]
    # Another uid (root) is untouched by nobody's flood.
    with alpc.connect("svc.open", config=config, timeout=5) as comm:
        assert comm.request(b"echo:root", timeout=5).data == b"ROOT"
    quota = alpc.port_stats("", config).broker
    assert quota.refused_connections == 1
    assert {u.uid: u.connections for u in quota.usage}[NOBODY] == 8
    visitor = role("client", "svc.open", "--as-user", str(NOBODY))
    refused = visitor.expect("REFUSED")
    assert refused[:2] == ["QuotaExceeded", Limit.MAX_CONNECTIONS_PER_UID]
    hog.send("release")
    hog.expect("RELEASED")
    # The broker sees the hog's hang-ups on its own time; poll its books, bounded.
    for _ in range(200):
        usage = {u.uid: u.connections for u in alpc.port_stats("", config).broker.usage}
        if NOBODY not in usage:
            break
    assert NOBODY not in usage
    again = role("client", "svc.open", "--as-user", str(NOBODY))
    assert again.expect("READY")


def test_ports_are_capped_per_uid(small_broker: alpc.Broker, config: alpc.Config) -> None:
    with alpc.create_port("svc.one", config=config), alpc.create_port("svc.two", config=config) as two:
        with pytest.raises(alpc.QuotaExceeded) as refused:
            alpc.create_port("svc.three", config=config)
        assert refused.value.limit == Limit.MAX_PORTS_PER_UID
        two.close()
        with alpc.create_port("svc.three", config=config):
            pass


def test_max_connections_refuses_the_next_client_until_one_leaves(broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.small", "--max-connections", "2")
    server.expect("READY")
    first, second = role("client", "svc.small"), role("client", "svc.small")
    first.expect("READY")
    second.expect("READY")
    third = role("client", "svc.small")
    assert third.expect("REFUSED")[:2] == ["QuotaExceeded", Limit.MAX_CONNECTIONS]
    first.send("close")
    first.expect("CLOSED")
    server.expect("PORT_CLOSED")
    fourth = role("client", "svc.small")
    assert fourth.expect("READY")


def test_requests_past_the_window_wait_and_the_offender_is_throttled(broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.window", "--max-pending", "4", "--pause-after", "1")
    server.expect("READY")
    client = role("client", "svc.window")
    client.expect("READY")
    server.expect("ACCEPTED")
    server.expect("PAUSED")
    client.send("burst 10 0.5")
    # Four went out and time out unanswered; six never left: they waited for the window.
    assert client.expect("BURST") == ["throttled:max_pending_requests=6", "timeouts=4"]
    server.send("go")
    client.send("burst 10 10")
    assert client.expect("BURST") == ["replies=10"]


def test_a_client_ignoring_the_window_is_dropped(broker: alpc.Broker, config: alpc.Config, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.rude", "--max-pending", "4", "--pause-after", "2")
    server.expect("READY")
    with alpc.connect("svc.rude", config=config, timeout=5) as honest:
        server.expect("ACCEPTED")
        rude = alpc.connect("svc.rude", config=config, timeout=5)
        server.expect("ACCEPTED")
        server.expect("PAUSED")
        rude._stream.send([b"".join(encode_frame(MessageType.REQUEST, b"r", message_id=n) for n in range(1, 11))])
        server.send("go")
        died = server.expect("CLIENT_DIED")
        assert died[0] == str(os.getpid()) and "max_pending_requests" in died[1]
        assert honest.request(b"echo:fine", timeout=5).data == b"FINE"
        rude.close()


def test_datagrams_past_the_window_wait_for_credits(broker: alpc.Broker, role) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.credits", "--max-datagrams", "5", "--pause-after", "1")
    server.expect("READY")
    client = role("client", "svc.credits")
    client.expect("READY")
    server.expect("ACCEPTED")
    server.expect("PAUSED")
    client.send("datagrams 20 0.5")
    assert client.expect("THROTTLED") == ["5", Limit.MAX_QUEUED_DATAGRAMS]
    server.send("go")
    client.send("datagrams 50 10")
    assert client.expect("SENT") == ["50"]
    for _ in range(55):
        server.expect("DATAGRAM")


def test_a_client_that_stops_reading_is_dropped_and_the_rest_are_served(broker: alpc.Broker,  # type: ignore[no-untyped-def]
                                                                       config: alpc.Config, role) -> None:
    server = role("server", "svc.deaf", "--inline-threshold", "65536", "--send-timeout", "1")
    server.expect("READY")
    with alpc.connect("svc.deaf", config=config, timeout=5) as honest:
        server.expect("ACCEPTED")
        deaf = role("client", "svc.deaf")
        deaf.expect("READY")
        server.expect("ACCEPTED")
        deaf.send("flood 64")  # 64 requests for 60 KB replies, never reading one
        deaf.expect("FLOODED")
        unanswered = server.expect("UNANSWERED")
        assert unanswered[1] == "Throttled" and "stopped_reading" in unanswered[2]
        assert "stopped_reading" in server.expect("CLIENT_DIED")[1]
        assert honest.request(b"echo:served", timeout=5).data == b"SERVED"

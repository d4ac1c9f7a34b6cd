"""Control bodies and port-name rules: strict, typed, and safe against garbage."""

from __future__ import annotations

import functools
from dataclasses import asdict

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpc import control
from alpc.errors import InvalidName, NameInUse, PortNotFound, ProtocolError, QuotaExceeded
from alpc.wire import MessageType


@pytest.mark.parametrize("name", ["a", "demo.echo", "svc/kv-store", "user@host:1", "_x", "A" * 128])
def test_valid_names(name: str) -> None:
    assert control.validate_port_name(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("", "1..128"),
    ("A" * 129, "1..128"),
    ("has space", "may only use"),
    ("-leading", "may only use"),
    ("caf\u00e9", "may only use"),
    ("a..b", "empty segment"),
    ("a//b", "empty segment"),
    ("trailing/", "trailing"),
    ("trailing.", "trailing"),
    (b"bytes", "must be a str"),
])
def test_invalid_names_say_why(name: object, why: str) -> None:
    with pytest.raises(InvalidName, match=why):
        control.validate_port_name(name)


def test_invalid_name_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        control.validate_port_name("")


def test_roundtrip_nested() -> None:
    body = control.PortList(ports=(control.PortInfo(
        name="x", pid=1, uid=2, gid=3, max_message_length=4,
        clients=(control.ClientInfo(pid=5, uid=6, gid=7),)),))
    assert control.decode_body(MessageType.PORT_LIST, control.encode_body(body), control.PortList) == body


@pytest.mark.parametrize(("raw", "why"), [
    ({"name": "x"}, "missing field 'data'"),
    ({"name": "x", "data": "text not bytes", "max_message_length": 1}, "expected bytes"),
    ({"name": "x", "data": b"", "max_message_length": True}, "expected int"),
    ({"name": "x", "data": b"", "max_message_length": 1, "max_section_bytes": 1, "evil": 1}, "unknown fields"),
])
def test_field_checks(raw: dict[str, object], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        control.decode_body(MessageType.CONNECT, msgpack.packb(raw, use_bin_type=True), control.Connect)


def test_wrong_frame_type_for_body() -> None:
    with pytest.raises(ProtocolError, match="expected a Connect frame"):
        control.decode_body(MessageType.PORT_LIST, control.encode_body(control.ListPorts()), control.Connect)


def test_error_codes_map_to_typed_exceptions() -> None:
    cases = {control.ErrorCode.NAME_IN_USE: NameInUse, control.ErrorCode.NOT_FOUND: PortNotFound,
             control.ErrorCode.BUSY: QuotaExceeded, "something new": ProtocolError}
    for code, kind in cases.items():
        assert type(control.ErrorReply(code=code, message="m").exception()) is kind


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_bodies_only_raise_protocol_error(data: bytes) -> None:
    for body in (control.Connect, control.CreatePort, control.PortList):
        try:
            control.decode_body(body.TYPE, data, body)
        except ProtocolError:
            pass


_VALUES = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1), st.text(max_size=5), st.binary(max_size=5),
    st.booleans(), st.none(), st.lists(st.integers(min_value=0, max_value=9), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "data", "max_message_length", "x", "clients"]), _VALUES))
def test_wrong_shaped_maps_only_raise_protocol_error(raw: dict[str, object]) -> None:
    data = msgpack.packb(raw, use_bin_type=True)
    try:
        control.decode_body(MessageType.CONNECT, data, control.Connect)
    except ProtocolError:
        pass


def _counters() -> control.PortCounters:
    return control.PortCounters(messages_in=3, bytes_in=10, latency_us=tuple(range(control.LATENCY_BUCKETS)))


def _peer_report() -> control.PeerReport:
    return control.PeerReport(pid=1, uid=2, gid=3, connected_ms=4, queue_depth=5, in_flight=2,
                              in_flight_ages_ms=(9, 8), messages_in=6, messages_out=7, bytes_in=8, bytes_out=9,
                              errors=0, section_bytes=0)


@pytest.mark.parametrize("body", [
    control.PortStatus(peers=(_peer_report(),), peers_total=1, counters=_counters()),
    control.PeerList(name="svc.a", pid=1, report_age_ms=-1, peers_total=1, peers=(_peer_report(),)),
    control.StatsList(uptime_ms=1, connects_unknown_port=2, protocol_errors=3, ports=(control.PortStats(
        name="svc.a", pid=1, uid=2, connections=3, report_age_ms=4, connects_forwarded=5, quota_refusals=6,
        connects_refused=7, counters=_counters()),)),
    control.HandoverState(listener=True, owns_socket_file=False, last=True,
                          peers=(control.HandoverPeer(id=0, role="server", inbound=b"x", close_when_flushed=False),),
                          items=(control.HandoverItem(peer=0, data=b"frame", with_fd=True),),
                          ports=(control.HandoverPort(name="svc.a", owner=0, max_message_length=1, max_connect_data=2,
                                                      max_pending_connects=3, connects_forwarded=4, quota_refusals=5,
                                                      connects_refused=6, status=b""),)),
    control.Peers(name="svc.a"), control.Stats(name=""), control.Handover(pid=1), control.HandoverDone(pid=2),
])
def test_roundtrip_operations_bodies(body: control.Body) -> None:
    assert control.decode_body(body.TYPE, control.encode_body(body), type(body)) == body
    _assert_plain_map(body)


def _assert_plain_map(body: control.Body) -> None:
    """The encoding is the record's plain map, nested records as maps: what peers of any version read."""
    unpack = functools.partial(msgpack.unpackb, raw=False)
    assert unpack(control.encode_body(body)) == unpack(msgpack.packb(asdict(body), use_bin_type=True))


@pytest.mark.parametrize(("raw", "why"), [
    ({"peers": [], "peers_total": 0, "counters": []}, "expected a map"),
    ({"peers": [], "peers_total": 0, "counters": {**asdict(control.PortCounters()), "latency_us": [1, 2]}},
     "expected 26 buckets"),
    ({"peers": [], "peers_total": 0, "counters": {**asdict(control.PortCounters()), "latency_us": ["x"] * 26}},
     "expected a list of ints"),
])
def test_status_report_checks(raw: dict[str, object], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        control.decode_body(MessageType.PORT_STATUS, msgpack.packb(raw, use_bin_type=True), control.PortStatus)


def test_a_report_naming_too_many_peers_is_refused() -> None:
    peer = asdict(_peer_report())
    raw = {"peers": [peer] * (control.MAX_REPORTED_PEERS + 1), "peers_total": 0,
           "counters": asdict(control.PortCounters())}
    with pytest.raises(ProtocolError, match="more than"):
        control.decode_body(MessageType.PORT_STATUS, msgpack.packb(raw, use_bin_type=True), control.PortStatus)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_operations_bodies_only_raise_protocol_error(data: bytes) -> None:
    for body in (control.PortStatus, control.PeerList, control.StatsList, control.HandoverState):
        try:
            control.decode_body(body.TYPE, data, body)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["peers", "peers_total", "counters", "x"]), _VALUES))
def test_wrong_shaped_reports_only_raise_protocol_error(raw: dict[str, object]) -> None:
    try:
        control.decode_body(MessageType.PORT_STATUS, msgpack.packb(raw, use_bin_type=True), control.PortStatus)
    except ProtocolError:
        pass


# -- the security bodies: ACLs, flow limits, port limits, broker quotas ----------------------------


_UIDS = st.lists(st.integers(0, 2**32 - 1), max_size=4, unique=True).map(lambda ids: tuple(sorted(ids)))
_ACLS = st.builds(control.AclSpec, allow_uids=_UIDS, allow_gids=_UIDS, deny_uids=_UIDS, deny_gids=_UIDS,
                  allow_root=st.booleans(), allow_everyone=st.booleans())
_FLOWS = st.builds(control.FlowSpec, max_pending_requests=st.integers(1, 65536),
                   max_queued_datagrams=st.integers(1, 1 << 20), max_handles_per_message=st.integers(0, 253),
                   max_inflight_handles=st.integers(0, 1 << 20), handle_kinds=st.integers(0, 2**16 - 1))


@settings(max_examples=200, deadline=None)
@given(_ACLS, _FLOWS, st.text(max_size=20))
def test_security_bodies_roundtrip(acl: control.AclSpec, flow: control.FlowSpec, limit: str) -> None:
    bodies: list[control.Body] = [
        control.CreatePort(name="svc.a", max_message_length=1, max_connect_data=2, max_pending_connects=3, acl=acl,
                           limits=control.PortLimits(max_connections=4, handle_kinds=("file", "pipe"))),
        control.Connect(name="svc.a", data=b"x", max_message_length=1, max_section_bytes=2, flow=flow,
                        required_server_uid=7),
        control.ConnectionReply(accepted=True, data=b"", reason="", max_message_length=1, flow=flow),
        control.ErrorReply(code=control.ErrorCode.BUSY, message="full", limit=limit),
        control.StatsList(uptime_ms=1, connects_unknown_port=0, protocol_errors=0, broker=control.BrokerQuota(
            shared=True, max_connections_per_uid=3, usage=(control.UidUsageInfo(uid=1, connections=2, ports=3),))),
    ]
    for body in bodies:
        assert control.decode_body(body.TYPE, control.encode_body(body), type(body)) == body
        _assert_plain_map(body)
    assert control.AclSpec.of(acl.acl()) == acl
    assert flow.limits().max_pending_requests == flow.max_pending_requests
    refusal = control.ErrorReply(code=control.ErrorCode.BUSY, message="full", limit=limit).exception()
    assert isinstance(refusal, QuotaExceeded) and refusal.limit == limit


@pytest.mark.parametrize("flow", [
    control.FlowSpec(max_pending_requests=0), control.FlowSpec(max_queued_datagrams=0),
    control.FlowSpec(max_handles_per_message=254), control.FlowSpec(max_pending_requests=65537),
    control.FlowSpec(max_inflight_handles=-1),
])
def test_flow_limits_no_honest_peer_announces_are_protocol_errors(flow: control.FlowSpec) -> None:
    with pytest.raises(ProtocolError, match="announced flow limits"):
        flow.limits()


def test_fields_an_older_peer_omits_take_their_safe_defaults() -> None:
    raw = {"name": "svc.a", "data": b"", "max_message_length": 1, "max_section_bytes": 2}
    body = control.decode_body(MessageType.CONNECT, msgpack.packb(raw, use_bin_type=True), control.Connect)
    assert body.required_server_uid == -1 and body.flow == control.FlowSpec()
    assert body.flow.max_handles_per_message == 0  # no fds unless announced


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_security_bodies_only_raise_protocol_error(data: bytes) -> None:
    for body in (control.ConnectionReply, control.ConnectionRequestInfo, control.ErrorReply, control.StatsList):
        try:
            decoded = control.decode_body(body.TYPE, data, body)
        except ProtocolError:
            continue
        if isinstance(decoded, (control.ConnectionReply, control.ConnectionRequestInfo)):
            try:
                decoded.flow.limits()
            except ProtocolError:
                pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["allow_uids", "allow_gids", "deny_uids", "allow_root", "x"]), _VALUES))
def test_wrong_shaped_acls_only_raise_protocol_error(raw: dict[str, object]) -> None:
    body = {"name": "svc.a", "max_message_length": 1, "max_connect_data": 1, "max_pending_connects": 1, "acl": raw}
    try:
        control.decode_body(MessageType.CREATE_PORT, msgpack.packb(body, use_bin_type=True),
                            control.CreatePort).acl.acl()
    except ProtocolError:
        pass

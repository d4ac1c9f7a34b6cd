"""Control bodies and port-name rules: strict, typed, and safe against garbage."""

from __future__ import annotations

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

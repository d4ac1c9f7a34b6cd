"""The RPC message format, sans-IO: values in, bytes out, and hostile bytes in."""

from __future__ import annotations

import array
import struct
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpc.errors import MarshalError, RemoteError
from alpc.protocol import payload_parts
from alpc.rpc.codec import (
    HEAD,
    RPC_VERSION,
    Codec,
    Ext,
    Kind,
    Limits,
    ObjectRef,
)
from alpc.rpc.hello import decode_hello, encode_hello

codec = Codec()


def joined(payload: Any) -> bytes:
    """What the receiver gets: the parts as one message."""
    return payload if isinstance(payload, bytes) else b"".join(bytes(part) for part in payload)


def call_of(payload: Any) -> list[Any]:
    return codec.decode_call(joined(payload))


def message(kind: int, envelope: bytes, *segments: bytes, version: int = RPC_VERSION) -> bytes:
    table = struct.pack(f"<{len(segments)}I", *map(len, segments))
    return HEAD.pack(version, kind, len(segments)) + table + envelope + b"".join(segments)


# -- round trips -----------------------------------------------------------------------


def test_small_call_is_one_buffer_head_and_envelope() -> None:
    payload, exported = codec.encode_call(0, "get", ("key", 3), None, None)
    assert isinstance(payload, bytes) and exported == []
    assert payload[:HEAD.size] == HEAD.pack(RPC_VERSION, Kind.CALL, 0)
    assert msgpack.unpackb(payload[HEAD.size:]) == [0, "get", ["key", 3], None, None]
    assert call_of(payload) == [0, "get", ["key", 3], None, None]


def test_kwargs_and_deadline_travel() -> None:
    payload, _ = codec.encode_call(7, "put", ("k",), {"value": [1, 2], "flag": True}, 123.5)
    assert call_of(payload) == [7, "put", ["k"], {"value": [1, 2], "flag": True}, 123.5]


@pytest.mark.parametrize("value", [
    None, True, 0, -1, 2**63, 1.5, "text", "ünïcode", b"bytes", [1, [2, [3]]], {"a": {"b": None}},
    datetime(2024, 5, 6, 7, 8, 9, 123456), datetime(2024, 5, 6, tzinfo=UTC),
    datetime(2024, 5, 6, 1, 2, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    date(1999, 12, 31), timedelta(days=-3, seconds=5, microseconds=7), timedelta(0),
])
def test_values_round_trip(value: Any) -> None:
    kind, decoded = codec.decode_reply(joined(codec.encode_result(value)))
    assert kind is Kind.RESULT
    assert decoded == value and type(decoded) is type(value)


def test_tuples_arrive_as_lists_and_bytearrays_as_bytes() -> None:
    assert codec.decode_reply(joined(codec.encode_result((1, 2))))[1] == [1, 2]
    assert codec.decode_reply(joined(codec.encode_result(bytearray(b"ab"))))[1] == b"ab"
    assert codec.decode_reply(joined(codec.encode_result(array.array("H", [1, 2]))))[1] == b"\x01\x00\x02\x00"


def test_an_exception_value_becomes_a_remote_error() -> None:
    _, decoded = codec.decode_reply(joined(codec.encode_result([KeyError("k"), OSError("disk")])))
    assert isinstance(decoded[0], KeyError) and isinstance(decoded[0], RemoteError)
    assert decoded[0].type_name == "KeyError" and decoded[0].remote_message == "'k'"
    assert isinstance(decoded[1], OSError) and decoded[1].remote_message == "disk"


def test_user_exception_types_keep_their_qualified_name() -> None:
    class Custom(Exception):
        pass

    _, decoded = codec.decode_reply(joined(codec.encode_result(Custom("x"))))
    assert type(decoded) is RemoteError
    assert decoded.type_name.endswith("test_user_exception_types_keep_their_qualified_name.<locals>.Custom")


def test_unmarshallable_values_are_refused_on_the_sender() -> None:
    with pytest.raises(MarshalError, match="cannot marshal a object"):
        codec.encode_call(0, "f", (object(),), None, None)
    with pytest.raises(MarshalError, match="cannot marshal a set"):
        codec.encode_result({"x": {1, 2}})
    with pytest.raises(MarshalError, match="64-bit range"):
        codec.encode_result(2**64)


def test_error_reply_round_trip() -> None:
    kind, error = codec.decode_reply(codec.encode_error("remote", "KeyError", "'k'", "Traceback..."))
    assert kind is Kind.ERROR
    assert error == ("remote", "KeyError", "'k'", "Traceback...")


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text() | st.binary(max_size=600),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
))
def test_any_msgpack_value_round_trips(value: Any) -> None:
    payload, _ = codec.encode_call(0, "m", (value,), {"kw": value}, None)
    got = call_of(payload)
    assert got[2][0] == value and got[3]["kw"] == value
    assert codec.decode_reply(joined(codec.encode_result(value)))[1] == value


# -- large buffers travel out of band ----------------------------------------------------


def test_large_argument_is_a_separate_part_not_a_copy() -> None:
    big = bytes(range(256)) * 4  # 1 KiB, over the 256 B threshold
    view_source = bytearray(b"z" * 300)
    payload, _ = codec.encode_call(0, "store", ("name", big, memoryview(view_source)), None, None)
    assert isinstance(payload, list)
    head, envelope, first, second = payload
    # The parts are the caller's own buffers, not copies.
    assert first.obj is big and second.obj is view_source
    assert len(envelope) < 64
    count = struct.unpack_from("<BBH", head)[2]
    assert count == 2 and struct.unpack_from("<2I", head, HEAD.size) == (1024, 300)
    args = call_of(payload)[2]
    assert args[0] == "name"
    assert isinstance(args[1], memoryview) and args[1].readonly and args[1] == big
    assert isinstance(args[2], memoryview) and args[2].readonly and bytes(args[2]) == b"z" * 300


def test_received_buffers_are_views_of_the_message() -> None:
    data = joined(codec.encode_result(b"q" * 5000))
    _, value = codec.decode_reply(data)
    assert isinstance(value, memoryview) and value.readonly
    assert value.obj is data  # no copy on the receiving side either


def test_threshold_is_bigger_than_not_equal() -> None:
    at = codec.encode_result(b"a" * 256)
    over = codec.encode_result(b"a" * 257)
    assert isinstance(at, bytes) and isinstance(over, list)
    assert codec.decode_reply(at)[1] == b"a" * 256


def test_buffers_in_a_returned_tuple_and_kwargs_are_lifted() -> None:
    result = codec.encode_result(("ok", b"r" * 400, b"small"))
    assert isinstance(result, list) and len(result) == 3
    assert codec.decode_reply(joined(result))[1][:1] == ["ok"]
    payload, _ = codec.encode_call(0, "f", (), {"blob": b"k" * 400}, None)
    assert isinstance(payload, list)
    assert bytes(call_of(payload)[3]["blob"]) == b"k" * 400


def test_typed_and_multidimensional_buffers_are_sent_flat() -> None:
    numbers = array.array("d", range(100))
    payload, _ = codec.encode_call(0, "f", (numbers,), None, None)
    (received,) = call_of(payload)[2]
    assert received.format == "B" and received.cast("d").tolist() == list(range(100))
    grid = memoryview(bytearray(600)).cast("B", (20, 30))
    payload, _ = codec.encode_call(0, "f", (grid,), None, None)
    assert len(call_of(payload)[2][0]) == 600
    strided = memoryview(bytes(range(256)) * 4)[::2]
    payload, _ = codec.encode_call(0, "f", (strided,), None, None)
    assert bytes(call_of(payload)[2][0]) == bytes(strided)


def test_deeper_buffers_are_packed_inline_and_still_arrive() -> None:
    payload, _ = codec.encode_call(0, "f", ([b"d" * 1000],), None, None)
    assert isinstance(payload, bytes)
    assert call_of(payload)[2] == [[b"d" * 1000]]


def test_payload_parts_flatten_for_the_transport() -> None:
    parts, total = payload_parts([b"ab", memoryview(array.array("i", [1, 2])), bytearray(b"c"), b""])
    assert total == 2 + 8 + 1 and len(parts) == 3
    with pytest.raises(ValueError, match="contiguous"):
        payload_parts([memoryview(b"abcd")[::2]])


# -- objects -----------------------------------------------------------------------------


def test_objects_are_exported_only_when_the_codec_can() -> None:
    class Thing:
        pass

    thing = Thing()
    exporting = Codec(export=lambda obj: ObjectRef(5, "cb", {"call": False}) if obj is thing else None,
                      import_object=lambda ref: ("proxy", ref))
    payload, exported = exporting.encode_call(0, "f", (thing, 1), None, None)
    assert exported == [5]
    assert exporting.decode_call(joined(payload))[2] == [("proxy", ObjectRef(5, "cb", {"call": False})), 1]
    with pytest.raises(MarshalError, match="not accepted"):
        Codec().decode_call(joined(payload))


# -- hostile bytes -----------------------------------------------------------------------


@pytest.mark.parametrize(("data", "match"), [
    (b"", "at least"),
    (b"\x01\x01", "at least"),
    (HEAD.pack(9, Kind.CALL, 0) + msgpack.packb([0, "f", [], None, None]), "version 9"),
    (HEAD.pack(RPC_VERSION, 77, 0) + b"\x90", "kind 77"),
    (HEAD.pack(RPC_VERSION, Kind.CALL, 0) + b"\xc1", "malformed msgpack"),
    (HEAD.pack(RPC_VERSION, Kind.CALL, 0) + b"\x95\x00", "malformed msgpack"),  # truncated
    (HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb([0, "f", [], None, None]) + b"\x00", "malformed"),
    (HEAD.pack(RPC_VERSION, Kind.CALL, 0) + b"\xdd\xff\xff\xff\xff", "malformed msgpack"),  # array32 of 4G
    (HEAD.pack(RPC_VERSION, Kind.CALL, 0) + b"\xc6\xff\xff\xff\xf0" + b"x" * 10, "malformed msgpack"),  # bin32
    (HEAD.pack(RPC_VERSION, Kind.CALL, 0) + b"\x91" * 3000 + b"\xc0", "malformed msgpack"),  # too deep
    (HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb({1: 2}), "malformed msgpack"),  # int map key
    (message(Kind.CALL, msgpack.packb([0, "f", [msgpack.ExtType(99, b"")], None, None])), "extension type 99"),
    (message(Kind.CALL, msgpack.packb([0, "f", [msgpack.ExtType(Ext.BUFFER, b"\0\0\0\0")], None, None])),
     "has none"),
    (message(Kind.CALL, msgpack.packb([0, "f", [msgpack.ExtType(Ext.BUFFER, b"\1\0\0\0")], None, None]), b"s"),
     "has 1"),
    (message(Kind.CALL, msgpack.packb([0, "f", [msgpack.ExtType(Ext.BUFFER, b"\0")], None, None]), b"s"),
     "4-byte"),
    (message(Kind.CALL, msgpack.packb([0, "f", [msgpack.ExtType(Ext.DATETIME, b"yesterday")], None, None])),
     "malformed"),
    (message(Kind.CALL, msgpack.packb([0, "f", [msgpack.ExtType(Ext.TIMEDELTA, b"\xff" * 11)], None, None])),
     "12 bytes"),
    (message(Kind.CALL, msgpack.packb([0, "f", [msgpack.ExtType(Ext.EXCEPTION, b"\x92\x01\x02")], None, None])),
     "2 strings"),
    (message(Kind.CALL, msgpack.packb([0, "f", [msgpack.ExtType(Ext.OBJECT, b"\x93\x01")], None, None])),
     "not accepted"),
    (HEAD.pack(RPC_VERSION, Kind.CALL, 3) + b"\0\0\0\0", "table runs past"),
    (HEAD.pack(RPC_VERSION, Kind.CALL, 1) + struct.pack("<I", 0xFFFFFFFF) + b"\x90", "exceed the message"),
    (HEAD.pack(RPC_VERSION, Kind.CALL, 2000) + b"\0" * 8000, "exceed the limit"),
    (HEAD.pack(RPC_VERSION, Kind.RESULT, 0) + msgpack.packb(1), "expected a call"),
    (message(Kind.CALL, msgpack.packb("not a list")), "a call is"),
    (message(Kind.CALL, msgpack.packb([0, "f", []])), "a call is"),
    (message(Kind.CALL, msgpack.packb([-1, "f", [], None, None])), "object id"),
    (message(Kind.CALL, msgpack.packb([0, b"f", [], None, None])), "method name"),
    (message(Kind.CALL, msgpack.packb([0, "f", {"a": 1}, None, None])), "args"),
    (message(Kind.CALL, msgpack.packb([0, "f", [], [1], None])), "kwargs"),
    (message(Kind.CALL, msgpack.packb([0, "f", [], None, "soon"])), "deadline"),
])
def test_malformed_calls_raise_marshal_error(data: bytes, match: str) -> None:
    with pytest.raises(MarshalError, match=match):
        codec.decode_call(data)


def test_configured_limits_apply_even_to_small_messages() -> None:
    strict = Codec(limits=Limits(max_array_len=5))  # a call envelope is an array of 5
    payload, _ = strict.encode_call(0, "f", (list(range(6)),), None, None)
    with pytest.raises(MarshalError, match="max_array_len"):
        strict.decode_call(joined(payload))
    assert strict.decode_call(joined(strict.encode_call(0, "f", ([1],), None, None)[0]))[2] == [[1]]


def test_large_messages_use_the_explicit_limits() -> None:
    limited = Codec(limits=Limits(max_str_len=100_000))
    payload, _ = limited.encode_call(0, "f", ("s" * 100_001,), None, None)
    with pytest.raises(MarshalError, match="max_str_len"):
        limited.decode_call(joined(payload))


def test_an_integer_deadline_is_accepted_as_float() -> None:
    assert codec.decode_call(message(Kind.CALL, msgpack.packb([0, "f", [], None, 5])))[4] == 5.0


@pytest.mark.parametrize("envelope", [
    [1, "KeyError", "m", None], ["remote", "KeyError", "m"], ["remote", "KeyError", "m", 5], "x",
])
def test_malformed_error_replies(envelope: Any) -> None:
    with pytest.raises(MarshalError):
        codec.decode_reply(message(Kind.ERROR, msgpack.packb(envelope)))


def test_a_call_is_not_a_reply() -> None:
    with pytest.raises(MarshalError, match="expected a reply"):
        codec.decode_reply(joined(codec.encode_call(0, "f", (), None, None)[0]))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_marshal_error(data: bytes) -> None:
    for candidate in (data, HEAD.pack(RPC_VERSION, Kind.CALL, 0) + data, HEAD.pack(RPC_VERSION, Kind.CALL, 1) + data):
        try:
            codec.decode_call(candidate)
        except MarshalError:
            pass
        try:
            codec.decode_reply(candidate)
        except MarshalError:
            pass


# -- hello -------------------------------------------------------------------------------


def test_hello_round_trip_and_garbage() -> None:
    assert decode_hello(encode_hello("kv", (2, 1))) == (RPC_VERSION, "kv", (2, 1))
    for garbage in (b"", b"\xc1", msgpack.packb([1]), msgpack.packb({"rpc": 1, "interface": "x"}),
                    msgpack.packb({"rpc": 1, "interface": "x", "version": [1, -1]}),
                    msgpack.packb({"rpc": "1", "interface": "x", "version": [1, 0]}),
                    msgpack.packb({"rpc": 1, "interface": "x" * 300, "version": [1, 0]})):
        with pytest.raises(MarshalError):
            decode_hello(garbage)


# Anything msgpack can carry, nested a little: what a hostile client may put in its connect data.
_ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
    | st.text(max_size=300) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=10) | st.dictionaries(st.text(max_size=12) | st.binary(max_size=4),
                                                                  inner, max_size=18),
    max_leaves=30,
)
# A hello whose fields have the right types, and values near and past their bounds.
_NEAR_HELLO = st.fixed_dictionaries({
    "rpc": st.integers(-1, 3),
    "interface": st.text(max_size=300),
    "version": st.lists(st.integers(-2, 3) | st.integers(0, 2**32) | st.booleans(), min_size=1, max_size=3),
})
# ... and one with any field replaced by anything.
_ODD_HELLO = st.fixed_dictionaries(
    {"rpc": st.integers(-1, 3) | _ANY_VALUE, "interface": st.text(max_size=20) | _ANY_VALUE,
     "version": st.lists(st.integers(-2, 3), max_size=3) | _ANY_VALUE},
    optional={"extra": _ANY_VALUE},
)


def _decodes_or_refuses(data: bytes) -> None:
    try:
        hello = decode_hello(data)
    except MarshalError:
        return
    # What it accepts is well-typed: the server compares these without further checks.
    assert type(hello.rpc) is int and type(hello.interface) is str and len(hello.interface) <= 256
    assert all(type(part) is int and part >= 0 for part in hello.version) and len(hello.version) == 2


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_decode_hello_of_random_bytes_only_raises_marshal_error(data: bytes) -> None:
    _decodes_or_refuses(data)


@settings(max_examples=500, deadline=None)
@given(_NEAR_HELLO | _ODD_HELLO | _ANY_VALUE, st.binary(max_size=4))
def test_decode_hello_of_any_msgpack_only_raises_marshal_error(fields: Any, trailer: bytes) -> None:
    packed = msgpack.packb(fields)
    _decodes_or_refuses(packed)
    _decodes_or_refuses(packed + trailer)  # trailing bytes after a valid value
    _decodes_or_refuses(packed[:-1])  # cut short


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}", fullmatch=True),
       st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)))
def test_hello_round_trips_every_interface_name_and_version(name: str, version: tuple[int, int]) -> None:
    assert decode_hello(encode_hello(name, version)) == (RPC_VERSION, name, version)


def test_container_count_is_bounded_in_large_messages() -> None:
    limited = Codec(limits=Limits(max_containers=1000))
    many = [[] for _ in range(1500)]
    payload, _ = limited.encode_call(0, "f", (many,), None, None)
    with pytest.raises(MarshalError, match="more than 1000 lists and maps"):
        limited.decode_call(joined(payload))
    assert len(limited.decode_call(joined(limited.encode_call(0, "f", ([[]] * 900,), None, None)[0]))[2][0]) == 900
    # The default bound makes a wire byte per empty list cost at most ~16 MB of lists.
    huge = HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb([0, "f", [[[]] * 70_000] * 5, None, None])
    with pytest.raises(MarshalError, match="lists and maps"):
        codec.decode_call(huge)

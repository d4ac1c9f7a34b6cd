"""Sans-IO frame encoding and decoding: bytes in, frames out."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpc import _native
from alpc.errors import ProtocolError
from alpc.wire import (
    ATTR_TYPES,
    HEADER,
    HEADER_SIZE,
    LONE_REF_SIZE,
    MAGIC,
    Attributes,
    AttrKind,
    Frame,
    FrameDecoder,
    FrameLimits,
    GrantAttr,
    MessageType,
    Range,
    Release,
    SectionNew,
    SectionRef,
    decode_attributes,
    decode_lone_ref,
    decode_releases,
    decode_section_ids,
    encode_attributes,
    encode_frame,
    encode_header,
    encode_lone_ref,
    encode_releases,
    encode_section_ids,
)

CHANNEL = FrameLimits(
    allowed_types=frozenset({MessageType.REQUEST, MessageType.REPLY, MessageType.DATAGRAM}),
    max_data=1024,
)


def test_header_is_40_bytes_like_port_message() -> None:
    assert HEADER_SIZE == 40


def test_roundtrip_fields() -> None:
    frame_bytes = encode_frame(MessageType.REPLY, b"abc", message_id=7, callback_id=5,
                               sender_pid=123, sender_tid=456)
    (frame,) = FrameDecoder(CHANNEL).feed(frame_bytes)
    assert frame.type is MessageType.REPLY
    assert (frame.message_id, frame.callback_id, frame.sender_pid, frame.sender_tid) == (7, 5, 123, 456)
    assert frame.data == b"abc"
    assert frame.fds == ()


def test_many_frames_in_one_read_and_split_reads() -> None:
    stream = b"".join(encode_frame(MessageType.DATAGRAM, bytes([i]) * i, message_id=i) for i in range(1, 50))
    whole = [f.data for f in FrameDecoder(CHANNEL).feed(stream)]
    decoder = FrameDecoder(CHANNEL)
    pieces = []
    for i in range(0, len(stream), 7):
        pieces += [f.data for f in decoder.feed(stream[i:i + 7])]
    assert whole == pieces == [bytes([i]) * i for i in range(1, 50)]
    assert decoder.buffered == 0


def test_more_frames_than_one_scan_batch() -> None:
    count = _native.SCAN_BATCH * 2 + 3
    stream = encode_frame(MessageType.DATAGRAM, b"x") * count
    assert len(FrameDecoder(CHANNEL).feed(stream)) == count


def test_wanted_reads_never_pass_a_frame() -> None:
    decoder = FrameDecoder(CHANNEL)
    assert decoder.wanted() == HEADER_SIZE
    frame = encode_frame(MessageType.REQUEST, b"0123456789")
    assert decoder.feed(frame[:HEADER_SIZE]) == []
    assert decoder.wanted() == 10
    assert len(decoder.feed(frame[HEADER_SIZE:])) == 1
    assert decoder.wanted() == HEADER_SIZE


def _corrupt(offset: int, fmt: str, value: int) -> bytes:
    frame = bytearray(encode_frame(MessageType.REQUEST, b"payload"))
    struct.pack_into(fmt, frame, offset, value)
    return bytes(frame)


@pytest.mark.parametrize(("frame", "reason"), [
    (_corrupt(0, "<H", 0xBEEF), "bad magic"),
    (_corrupt(2, "<B", 9), "version"),
    (_corrupt(3, "<B", MessageType.CONNECT), "type not allowed"),
    (_corrupt(3, "<B", 200), "type not allowed"),
    (_corrupt(4, "<I", 0x80), "flag"),
    (_corrupt(8, "<I", 0xFFFFFFFF), "data length"),
    (_corrupt(12, "<I", 1), "attribute length"),
    (_corrupt(32, "<H", 1), "fd count"),
    (_corrupt(34, "<H", 1), "reserved"),
    (_corrupt(36, "<I", 1), "reserved"),
])
def test_bad_headers_are_protocol_errors(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        FrameDecoder(CHANNEL).feed(frame)


def test_lying_length_caught_from_the_header_alone() -> None:
    header = encode_header(MessageType.REQUEST, 10_000_000)
    with pytest.raises(ProtocolError, match="data length"):
        FrameDecoder(CHANNEL).feed(header)


def test_unannounced_fds_are_closed_and_refused() -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ProtocolError, match="no frame announced"):
        FrameDecoder(CHANNEL).feed(encode_frame(MessageType.REQUEST, b"x"), [r])
    with pytest.raises(OSError):
        os.fstat(r)


def test_fds_are_assigned_in_order() -> None:
    limits = FrameLimits(allowed_types=CHANNEL.allowed_types, max_data=64, max_fds=2)
    a, b = os.pipe()
    try:
        decoder = FrameDecoder(limits)
        frames = decoder.feed(encode_frame(MessageType.REQUEST, b"x", n_fds=2) + encode_frame(MessageType.DATAGRAM),
                              [a, b])
        assert frames[0].fds == (a, b)
        assert frames[1].fds == ()
    finally:
        os.close(a)
        os.close(b)


def test_frame_claiming_missing_fds_is_refused() -> None:
    limits = FrameLimits(allowed_types=CHANNEL.allowed_types, max_data=64, max_fds=2)
    with pytest.raises(ProtocolError, match="more fds"):
        FrameDecoder(limits).feed(encode_frame(MessageType.REQUEST, b"x", n_fds=1))


def test_an_error_later_in_a_read_closes_the_fds_of_frames_already_cut() -> None:
    limits = FrameLimits(allowed_types=CHANNEL.allowed_types, max_data=64, max_fds=2)
    for tail in (b"garbage" * 10, encode_frame(MessageType.REQUEST, b"y", n_fds=2)):
        first, second = os.pipe()
        good = encode_frame(MessageType.REQUEST, b"x", n_fds=1)
        with pytest.raises(ProtocolError):
            FrameDecoder(limits).feed(good + tail, [first, second])
        for fd in (first, second):
            with pytest.raises(OSError):
                os.fstat(fd)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder(CHANNEL)
    try:
        for i in range(0, len(data), chunk):
            for frame in decoder.feed(data[i:i + chunk]):
                assert len(frame.data) <= CHANNEL.max_data
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 3]), st.binary(max_size=200)), max_size=20),
       st.integers(min_value=1, max_value=300))
def test_any_chunking_yields_the_same_frames(messages: list[tuple[int, bytes]], chunk: int) -> None:
    stream = b"".join(encode_frame(kind, data, message_id=i) for i, (kind, data) in enumerate(messages))
    decoder = FrameDecoder(CHANNEL)
    got = []
    for i in range(0, len(stream), chunk):
        got += [(int(f.type), f.data) for f in decoder.feed(stream[i:i + chunk])]
    assert got == messages


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE * 3))
def test_mutated_headers_match_between_implementations(data: bytes) -> None:
    """The C scanner and its pure-Python twin agree on every input (when C is built)."""
    frame = bytearray(encode_frame(MessageType.REQUEST, b"abc"))
    mutated = bytes(frame[:4]) + data[4:HEADER_SIZE] + data[HEADER_SIZE:]
    limits = CHANNEL.native()
    expected = _native._scan_frames_py(mutated, 0, limits)
    if _native.IMPLEMENTATION == "c":
        assert _native._scan_frames_c(mutated, 0, limits) == expected


def test_magic_constant_matches_header_layout() -> None:
    assert HEADER.unpack(encode_header(MessageType.REQUEST, 0))[0] == MAGIC


# -- attributes ------------------------------------------------------------------------


_U32 = st.integers(0, 0xFFFFFFFF)
_U64 = st.integers(0, (1 << 64) - 1)


def attr_frame(kind: MessageType, attrs: bytes, data: bytes = b"", fds: tuple[int, ...] = ()) -> Frame:
    return Frame(kind, 0, 1, 0, 0, 0, attrs, data, fds)


@settings(max_examples=200)
@given(
    st.none() | st.tuples(_U32, st.integers(0, 3), _U64, _U64),
    st.none() | st.tuples(_U32, st.integers(0, 3), _U64),
    st.none() | st.tuples(_U64, _U64, st.integers(1, 3)),
)
def test_attributes_roundtrip(ref: tuple[int, ...] | None, new: tuple[int, ...] | None,
                              grant: tuple[int, ...] | None) -> None:
    if new is not None:
        ref = (new[0], *(ref or (0, 0, 0, 1))[1:])
    attrs = Attributes(
        ref=SectionRef(*ref) if ref is not None else None,
        new=SectionNew(*new) if new is not None else None,
        grant=GrantAttr(*grant) if grant is not None else None,
    )
    frame = attr_frame(MessageType.REQUEST, encode_attributes(attrs), fds=(7,) if new is not None else ())
    assert decode_attributes(frame) == attrs


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("<HH", kind, len(value)) + value


REF = struct.pack("<IIQQ", 1, 0, 0, 10)


@pytest.mark.parametrize(("kind", "attrs", "why"), [
    (MessageType.REQUEST, tlv(9, b"x" * 8), "unknown attribute kind"),
    (MessageType.REPLY, tlv(AttrKind.GRANT, b"\0" * 24), "may not carry"),
    (MessageType.PING, tlv(AttrKind.SECTION_REF, REF), "may not carry"),
    (MessageType.REQUEST, tlv(AttrKind.SECTION_REF, REF[:-1]), "length does not match"),
    (MessageType.REQUEST, tlv(AttrKind.SECTION_REF, REF) * 2, "twice"),
    (MessageType.REQUEST, tlv(AttrKind.SECTION_REF, REF)[:-3], "ends inside"),
    (MessageType.REQUEST, b"\x01\x00", "ends inside"),
    (MessageType.REQUEST, tlv(AttrKind.SECTION_REF, struct.pack("<IIQQ", 1, 8, 0, 1)), "unknown flags"),
    (MessageType.REQUEST, tlv(AttrKind.GRANT, struct.pack("<QQII", 0, 1, 1, 5)), "reserved"),
    (MessageType.REQUEST, tlv(AttrKind.GRANT, struct.pack("<QQII", 0, 1, 4, 0)), "unknown flags"),
])
def test_bad_attributes_are_protocol_errors(kind: MessageType, attrs: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode_attributes(attr_frame(kind, attrs))


def test_attributes_must_agree_with_fds_and_data() -> None:
    new = tlv(AttrKind.SECTION_NEW, struct.pack("<IIQ", 1, 0, 4096))
    ref = tlv(AttrKind.SECTION_REF, REF)
    # A datagram's fds beyond the section's are its handles; runtime frames carry none.
    assert decode_attributes(attr_frame(MessageType.DATAGRAM, ref, fds=(5,))).ref is not None
    span = tlv(AttrKind.RANGE, struct.pack("<QQ", 0, 10))
    with pytest.raises(ProtocolError, match="fds"):
        decode_attributes(attr_frame(MessageType.GRANT_WRITE, ref + span, fds=(5,)))
    with pytest.raises(ProtocolError, match="no fd"):
        decode_attributes(attr_frame(MessageType.DATAGRAM, ref + new))
    with pytest.raises(ProtocolError, match="reference into it"):
        decode_attributes(attr_frame(MessageType.DATAGRAM, new, fds=(5,)))
    other = tlv(AttrKind.SECTION_REF, struct.pack("<IIQQ", 2, 0, 0, 10))
    with pytest.raises(ProtocolError, match="reference into it"):
        decode_attributes(attr_frame(MessageType.DATAGRAM, other + new, fds=(5,)))
    with pytest.raises(ProtocolError, match="inline data too"):
        decode_attributes(attr_frame(MessageType.DATAGRAM, ref, data=b"x"))
    assert decode_attributes(attr_frame(MessageType.DATAGRAM, ref + new, fds=(5,))).new == SectionNew(1, 0, 4096)


def test_each_frame_type_allows_only_its_attributes() -> None:
    assert ATTR_TYPES[MessageType.REQUEST] & (1 << AttrKind.GRANT)
    assert not ATTR_TYPES[MessageType.DATAGRAM] & (1 << AttrKind.GRANT)
    assert ATTR_TYPES[MessageType.GRANT_READ] == 1 << AttrKind.RANGE
    span = tlv(AttrKind.RANGE, struct.pack("<QQ", 5, 6))
    assert decode_attributes(attr_frame(MessageType.GRANT_READ, span)).range == Range(5, 6)


@settings(max_examples=500)
@given(st.binary(max_size=120), st.integers(0, 0xFFFFFFFF))
def test_attribute_parsers_agree_between_implementations(raw: bytes, allowed: int) -> None:
    expected = _native._parse_attributes_py(raw, allowed)
    if _native.IMPLEMENTATION == "c":
        assert _native._parse_attributes_c(raw, allowed) == expected


_LONE_REF_BYTES = st.one_of(
    st.binary(min_size=LONE_REF_SIZE, max_size=LONE_REF_SIZE),
    st.builds(lambda sid, flags, offset, length: encode_lone_ref(sid, flags, offset, length),
              _U32, st.integers(0, 7), _U64, _U64),
    st.builds(lambda tlv, ref: tlv + ref, st.binary(min_size=4, max_size=4),
              st.binary(min_size=LONE_REF_SIZE - 4, max_size=LONE_REF_SIZE - 4)),
)


@settings(max_examples=500)
@given(_LONE_REF_BYTES, st.sampled_from(list(MessageType)))
def test_lone_reference_shortcut_agrees_with_the_general_parser(raw: bytes, kind: MessageType) -> None:
    # The receive fast path decodes a lone SECTION_REF by itself: it must accept exactly
    # what decode_attributes accepts as one reference, and give the same fields.
    try:
        general = decode_attributes(Frame(kind, 0, 1, 0, 0, 0, raw, b"", ()))
    except ProtocolError:
        general = None
    lone = decode_lone_ref(b"pad" + raw, 3, int(kind))
    if lone is not None:
        assert general == Attributes(ref=lone)
    elif kind in (MessageType.REQUEST, MessageType.REPLY, MessageType.DATAGRAM):
        assert general is None or general.ref is None or general.new is not None


@settings(max_examples=200)
@given(st.lists(st.tuples(_U32, _U64, _U64), max_size=30))
def test_release_and_close_bodies_roundtrip(entries: list[tuple[int, int, int]]) -> None:
    releases = [Release(*entry) for entry in entries]
    assert decode_releases(encode_releases(releases)) == releases
    ids = [entry[0] for entry in entries]
    assert decode_section_ids(encode_section_ids(ids)) == ids


def test_bad_release_bodies() -> None:
    with pytest.raises(ProtocolError, match="whole number"):
        decode_releases(b"\0" * 23)
    with pytest.raises(ProtocolError, match="reserved"):
        decode_releases(struct.pack("<IIQQ", 1, 1, 0, 1))
    with pytest.raises(ProtocolError, match="whole number"):
        decode_section_ids(b"\0" * 5)

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
    HEADER,
    HEADER_SIZE,
    MAGIC,
    FrameDecoder,
    FrameLimits,
    MessageType,
    encode_frame,
    encode_header,
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

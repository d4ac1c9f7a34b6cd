"""Hostile peers at the broker: garbage, lying lengths, unknown types, fd floods, idle floods.

Each is dropped (or refused) on its own; the broker keeps serving everyone else and
holds on to nothing (the broker runs in the test process, so the leak check sees it).
"""

from __future__ import annotations

import array
import os
import socket

import pytest

import alpc
from alpc import control
from alpc.exchange import control_frame
from alpc.wire import FrameDecoder, FrameLimits, MessageType, encode_frame, encode_header


def _raw(config: alpc.Config) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(config.broker_socket))
    return sock


def _closed_by_broker(sock: socket.socket) -> bool:
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    finally:
        sock.close()


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.0\r\n\r\n" + b"\0" * 40,
    encode_header(MessageType.CONNECT, 0xFFFFFFFF),            # a lying length
    encode_frame(MessageType.REPLY, b"not a broker request"),   # a type the broker never takes
    encode_header(99, 0),                                        # an unknown type
    encode_frame(MessageType.CONNECT, b"\xc1\xc1 not msgpack"),
    encode_frame(MessageType.CREATE_PORT, b"\x80"),
    encode_frame(MessageType.CONNECT, control.encode_body(control.Connect(
        name="svc.survivor", data=b"", max_message_length=1, max_section_bytes=1,
        flow=control.FlowSpec(max_pending_requests=0)))),          # flow limits no honest client announces
    encode_frame(MessageType.CREATE_PORT, control.encode_body(control.CreatePort(
        name="svc.acl", max_message_length=1, max_connect_data=1, max_pending_connects=1,
        acl=control.AclSpec(allow_uids=(-1,))))),                  # an ACL naming no uid
])
def test_garbage_closes_only_that_connection(broker: alpc.Broker, config: alpc.Config, payload: bytes) -> None:
    with alpc.create_port("svc.survivor", config=config) as port:
        innocent = _raw(config)
        bad = _raw(config)
        bad.sendall(payload)
        assert _closed_by_broker(bad)
        innocent.sendall(encode_frame(MessageType.LIST_PORTS, b"\x80"))
        header = innocent.recv(40)
        assert header[3] == MessageType.PORT_LIST
        innocent.close()
        assert [p.name for p in alpc.list_ports(config)] == ["svc.survivor"]
        assert port.name == "svc.survivor"


def test_truncated_frame_then_hangup_is_harmless(broker: alpc.Broker, config: alpc.Config) -> None:
    bad = _raw(config)
    bad.sendall(encode_frame(MessageType.CONNECT, b"x" * 100)[:60])
    bad.close()
    assert alpc.list_ports(config) == ()


def test_fds_flooded_at_the_broker_are_never_installed(broker: alpc.Broker, config: alpc.Config) -> None:
    """The broker reads with plain recv: the kernel drops passed fds instead of installing them.

    The broker runs in this process, so the leak check after the test would see any it kept.
    """
    read_end, write_end = os.pipe()
    try:
        bad = _raw(config)
        flood = array.array("i", [read_end] * 200)
        bad.sendmsg([encode_frame(MessageType.LIST_PORTS, b"\x80")], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, flood)])
        header = bad.recv(40)
        assert header[3] == MessageType.PORT_LIST  # answered as if the fds were never there
        bad.close()
        assert alpc.list_ports(config) == ()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_port_refused_for_a_bad_acl_leaves_no_trace(broker: alpc.Broker, config: alpc.Config) -> None:
    bad = _raw(config)
    body = control.CreatePort(name="svc.bad-acl", max_message_length=1, max_connect_data=1, max_pending_connects=1,
                              acl=control.AclSpec(deny_gids=(1 << 40,)))
    bad.sendall(b"".join(control_frame(body)))
    assert _closed_by_broker(bad)
    assert alpc.list_ports(config) == ()
    with alpc.create_port("svc.bad-acl", config=config):
        pass


def _answer_then_hangup(sock: socket.socket) -> control.ErrorReply:
    """The one ERROR frame the broker answers with before it hangs up (EOF, never a second frame)."""
    decoder = FrameDecoder(FrameLimits(allowed_types=frozenset({MessageType.ERROR}), max_data=1 << 16))
    frames = []
    try:
        while data := sock.recv(65536):
            frames += decoder.feed(data)
    finally:
        sock.close()
    (frame,) = frames
    return control.decode_body(frame.type, frame.data, control.ErrorReply)


@pytest.mark.parametrize("name", ["", "bad name", "../etc/passwd", ".hidden", "svc..x", "svc//x", "svc/",
                                  "svc.", "x" * 129, "svc\0nul", "svc.\u00e9"])
def test_an_invalid_name_sent_raw_is_refused_by_the_broker(broker: alpc.Broker, config: alpc.Config,
                                                           name: str) -> None:
    """The client library validates names first; the broker must not rely on it."""
    with alpc.create_port("svc.survivor", config=config):
        bad = _raw(config)
        bad.sendall(b"".join(control_frame(control.CreatePort(
            name=name, max_message_length=1024, max_connect_data=16, max_pending_connects=1))))
        refusal = _answer_then_hangup(bad)
        assert refusal.code == control.ErrorCode.INVALID_NAME
        assert isinstance(refusal.exception(), alpc.InvalidName)
        assert [p.name for p in alpc.list_ports(config)] == ["svc.survivor"]
        with alpc.create_port("svc.after", config=config):  # and it goes on registering honest names
            assert [p.name for p in alpc.list_ports(config)] == ["svc.after", "svc.survivor"]

"""Hostile bytes on an established channel, both ways: malformed frames, lying lengths,
truncated frames, unknown types, replies to ids never sent, and (from a server) bad section
references and a section truncated under its client. The offender's channel is dropped;
everyone else is still served; nothing leaks (the other side's fds are counted)."""

from __future__ import annotations

import os
import socket

import pytest

import alpc
from alpc.section import Section
from alpc.wire import (
    Attributes,
    MessageType,
    SectionNew,
    SectionRef,
    encode_attributes,
    encode_frame,
    encode_header,
)


def test_lying_length_closes_only_that_channel(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.victim", "--max-message-length", "1000")
    server.expect("READY")
    honest = alpc.connect("svc.victim", config=config, timeout=5)
    hostile = alpc.connect("svc.victim", config=config, timeout=5)
    hostile._stream.send([encode_header(MessageType.REQUEST, 5000, message_id=1)])
    assert server.expect("CLIENT_DIED")[0] == str(os.getpid())
    with pytest.raises(alpc.PeerGone):
        hostile.request(b"anything", timeout=5)
    assert honest.request(b"still served", timeout=5).data == b"STILL SERVED"
    honest.close()
    hostile.close()


HOSTILE_FRAMES = {
    "garbage": [b"\xde\xad\xbe\xef" * 20],
    "unknown_type": [encode_frame(77, b"", message_id=1)],
    "broker_type_on_a_channel": [encode_frame(MessageType.CREATE_PORT, b"\x80")],
    "reply_to_an_id_never_sent": [encode_frame(MessageType.REPLY, b"x", callback_id=4242)],
    "unknown_flags": [encode_header(MessageType.DATAGRAM, 0, flags=0x80, message_id=1)],
    "reused_request_id": [encode_frame(MessageType.REQUEST, b"q", message_id=7)] * 2,
    "forged_credit": [encode_frame(MessageType.CREDIT, b"\x05\0\0\0\0\0\0\0")],
}
# Part of a frame, then end-of-stream (a half-close: our end stays open): the reason names it.
TRUNCATED = "truncated_then_eof"
HOSTILE_FRAMES[TRUNCATED] = [encode_frame(MessageType.REQUEST, b"q" * 100, message_id=1)[:-40]]


@pytest.mark.parametrize("attack", sorted(HOSTILE_FRAMES))
def test_a_hostile_client_loses_only_its_channel(broker: alpc.Broker, config: alpc.Config, role, attack: str) -> None:  # type: ignore[no-untyped-def]
    server = role("server", "svc.frames")
    server.expect("READY")
    with alpc.connect("svc.frames", config=config, timeout=5) as honest:
        server.expect("ACCEPTED")
        assert honest.request(b"echo:warm", timeout=5).data == b"WARM"
        server.expect("REQUEST")
        server.send("fds")
        baseline = int(server.expect("FDS")[0])
        hostile = alpc.connect("svc.frames", config=config, timeout=5)
        server.expect("ACCEPTED")
        hostile._stream.send(HOSTILE_FRAMES[attack])
        if attack == TRUNCATED:
            end = socket.socket(fileno=os.dup(hostile.fileno()))
            end.shutdown(socket.SHUT_WR)
            end.close()
        died = server.expect("CLIENT_DIED")
        assert died[0] == str(os.getpid()), died
        assert ("mid-frame" if attack == TRUNCATED else "protocol_error") in died[1], died
        with pytest.raises(alpc.PeerGone):
            hostile.request(b"echo:anything", timeout=5)
        assert honest.request(b"echo:still served", timeout=5).data == b"STILL SERVED"
        server.send("fds")
        assert int(server.expect("FDS")[0]) == baseline
        hostile.close()


# -- a malicious server against a real client ------------------------------------------------------


SERVER_ATTACKS = {
    "garbage": [b"\xff" * 64],
    "lying_length": [encode_header(MessageType.REPLY, 0xFFFFFF00, callback_id=1)],
    "unknown_type": [encode_frame(99, b"")],
    "reply_to_an_id_never_sent": [encode_frame(MessageType.REPLY, b"x", callback_id=999_999)],
    "request_past_the_window": [b"".join(encode_frame(MessageType.REQUEST, b"r", message_id=n)
                                         for n in range(1, 1100))],
}


def _reply_attrs(attrs: Attributes, n_fds: int = 0) -> bytes:
    """A reply to the client's first request (id 1 on a fresh connection) whose body is in a section."""
    raw = encode_attributes(attrs)
    return encode_header(MessageType.REPLY, 0, callback_id=1, attr_length=len(raw), n_fds=n_fds) + raw


SERVER_ATTACKS["unknown_section_reference"] = [_reply_attrs(Attributes(ref=SectionRef(9, 0, 0, 100)))]
SERVER_ATTACKS["section_reference_out_of_range"] = [
    _reply_attrs(Attributes(ref=SectionRef(1, 0, 4000, 200), new=SectionNew(1, 0, 4096)), n_fds=1)]
SERVER_ATTACKS["unsealed_section_truncated"] = [
    _reply_attrs(Attributes(ref=SectionRef(1, 0, 0, 100), new=SectionNew(1, 0, 4096)), n_fds=1)]


def _section_fd(attack: str) -> int | None:
    """The memfd an attack passes: sealed for the range attack, unsealed (then truncated) for the other."""
    if attack == "section_reference_out_of_range":
        section = Section.create(4096)
        fd = os.dup(section.fd)
        section.close()
        return fd
    if attack == "unsealed_section_truncated":
        fd = os.memfd_create("hostile")
        os.ftruncate(fd, 4096)
        return fd
    return None


@pytest.mark.parametrize("attack", sorted(SERVER_ATTACKS))
def test_a_malicious_server_cannot_hurt_its_client(broker: alpc.Broker, config: alpc.Config, role,  # type: ignore[no-untyped-def]
                                                   attack: str) -> None:
    honest_server = role("server", "svc.honest")
    honest_server.expect("READY")
    with alpc.create_port("svc.evil", config=config) as evil:
        client = role("client", "svc.evil")
        comm = evil.listen(timeout=10).accept()
        client.expect("READY")
        client.send("request echo:first")
        request = comm.receive(timeout=10)
        fd = _section_fd(attack)
        try:
            comm._stream.send(SERVER_ATTACKS[attack], [fd] if fd is not None else [])
            if attack == "unsealed_section_truncated":
                os.ftruncate(fd, 0)  # would SIGBUS a client that had mapped it
        finally:
            if fd is not None:
                os.close(fd)
        assert client.expect("ERROR")[0] in ("PeerGone", "ConnectionClosed")
        assert request.type is MessageType.REQUEST
        comm.close()
    # The client's runtime dropped only that channel: the same process still talks to an honest server.
    client.send("other svc.honest")
    assert client.expect("OTHER") == ["FINE"]

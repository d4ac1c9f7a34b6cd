"""Coverage-guided fuzzing (atheris / libFuzzer) of everything that parses a peer's bytes.

    python tests/fuzz/fuzz_targets.py TARGET [--runs N | --seconds S]

Targets:

- ``wire``: the channel's frame decoder and everything behind it — a sans-IO
  ``Channel`` (with sections, handles and flow control) fed the input in
  pieces, plus the attribute, release, section-id and credit decoders directly.
- ``broker``: the broker's request parser — its frame decoder with the limits
  of each role, then the strict msgpack body of every frame type it accepts,
  and the checks it makes before acting (flow limits, ACLs, names).
- ``handshake``: what a client and a server parse while connecting
  (connection replies, connection requests, errors).

The contract: any input returns normally or raises ProtocolError (or another
AlpcError naming what was wrong). Anything else — an IndexError, a crash of the
C extension, a hang — is a finding: libFuzzer stops, writes the input to
``--artifacts``, and this exits non-zero. libFuzzer's last lines say how many
inputs ran (``Done N runs``). ``ALPC_PUREPYTHON=1`` fuzzes the pure-Python twin
of the C parsers instead of the extension.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["alpc"]):
    from alpc import control
    from alpc.errors import AlpcError
    from alpc.protocol import Channel, ConnectionPolicy
    from alpc.quotas import FlowLimits, decode_credit
    from alpc.section import ConnectionSections
    from alpc.security import HandleKind, PeerCred
    from alpc.wire import (
        Attributes,
        Frame,
        FrameDecoder,
        FrameLimits,
        MessageType,
        SectionNew,
        SectionRef,
        decode_attributes,
        decode_releases,
        decode_section_ids,
        encode_attributes,
        encode_frame,
        encode_header,
    )

PEER = PeerCred(1, 1000, 1000)
_BROKER_ROLES = {
    "new": frozenset({MessageType.CREATE_PORT, MessageType.CONNECT, MessageType.HANDOVER, MessageType.LIST_PORTS,
                      MessageType.PEERS, MessageType.STATS}),
    "server": frozenset({MessageType.PORT_STATUS}),
}
_BODIES: dict[MessageType, type[control.Body]] = {
    MessageType.CREATE_PORT: control.CreatePort, MessageType.CONNECT: control.Connect,
    MessageType.HANDOVER: control.Handover, MessageType.LIST_PORTS: control.ListPorts,
    MessageType.PEERS: control.Peers, MessageType.STATS: control.Stats, MessageType.PORT_STATUS: control.PortStatus,
}


def _never(fd: int) -> HandleKind:
    return HandleKind.OTHER


def _channel() -> Channel:
    sections = ConnectionSections.build(inline_threshold=256, send_quota=1 << 20, recv_quota=1 << 20,
                                        max_length=1 << 20, section_size=1 << 16, backend="memfd",
                                        allow_unsealed=False, secure=False)
    policy = ConnectionPolicy(local=FlowLimits(8, 8, 2, 4), peer=FlowLimits(8, 8, 2, 4),
                              accept_kinds=frozenset({HandleKind.PIPE}))
    return Channel(PEER, send_limit=1 << 20, recv_limit=1 << 20, local_pid=2, sections=sections, policy=policy,
                   classifier=_never)


def fuzz_wire(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cut = fdp.ConsumeIntInRange(1, 64)
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    channel = _channel()
    try:
        try:
            for start in range(0, len(payload), cut):
                sender = PEER if start % 3 else PeerCred(1, 1000 + start % 2, 1000)
                for message in channel.receive(payload[start:start + cut], (), sender):
                    message.close_handles()
                channel.take_automatic()
                channel.take_releases()
        except AlpcError:
            pass
    finally:
        channel.release_resources()
    for parse in (decode_releases, decode_section_ids, decode_credit):
        try:
            parse(payload)
        except AlpcError:
            pass
    for kind in (MessageType.REQUEST, MessageType.DATAGRAM, MessageType.GRANT_DATA, MessageType.RELEASE):
        try:
            decode_attributes(Frame(kind, 0, 1, 0, 0, 0, payload[:128], b"", ()))
        except AlpcError:
            pass


def fuzz_broker(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    role = "new" if fdp.ConsumeBool() else "server"
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    decoder = FrameDecoder(FrameLimits(allowed_types=_BROKER_ROLES[role], max_data=1 << 20))
    try:
        for frame in decoder.feed(payload):
            body = control.decode_body(frame.type, frame.data, _BODIES[frame.type])
            if isinstance(body, control.Connect):
                body.flow.limits()
                control.check_connect_limits(body)
                control.validate_port_name(body.name)
            elif isinstance(body, control.CreatePort):
                body.acl.acl()
                control.validate_port_name(body.name)
    except AlpcError:
        pass
    # The body parser alone, for every type the broker takes, without the frame around it.
    for kind, body_type in _BODIES.items():
        try:
            control.decode_body(kind, payload, body_type)
        except AlpcError:
            pass


def fuzz_handshake(data: bytes) -> None:
    for body_type in (control.ConnectionReply, control.ConnectionRequestInfo, control.ErrorReply,
                      control.PortList, control.StatsList, control.PeerList):
        try:
            body = control.decode_body(body_type.TYPE, data, body_type)
        except AlpcError:
            continue
        if isinstance(body, (control.ConnectionReply, control.ConnectionRequestInfo)):
            try:
                body.flow.limits()
                if isinstance(body, control.ConnectionRequestInfo):
                    control.check_connect_limits(body)
            except AlpcError:
                pass
        elif isinstance(body, control.ErrorReply):
            body.exception()


TARGETS: dict[str, Callable[[bytes], None]] = {"wire": fuzz_wire, "broker": fuzz_broker,
                                               "handshake": fuzz_handshake}


def seeds(target: str) -> list[bytes]:
    """Valid inputs to start from, so mutations begin deep inside the parsers."""
    frames = [
        encode_frame(MessageType.REQUEST, b"hello", message_id=1),
        encode_frame(MessageType.DATAGRAM, b"x" * 40, message_id=2),
        encode_frame(MessageType.PING, b"", message_id=3),
        encode_frame(MessageType.CREDIT, struct.pack("<II", 1, 0)),
        encode_frame(MessageType.RELEASE, struct.pack("<IIQQ", 1, 0, 0, 64)),
    ]
    attrs = encode_attributes(Attributes(ref=SectionRef(1, 0, 0, 100), new=SectionNew(1, 0, 4096)))
    frames.append(encode_header(MessageType.REQUEST, 0, message_id=4, attr_length=len(attrs)) + attrs)
    if target == "wire":
        return [bytes([8]) + b"".join(frames), bytes([40]) + frames[0] + frames[3]]
    bodies: list[control.Body] = [
        control.Connect(name="svc.a", data=b"hi", max_message_length=1 << 20, max_section_bytes=1 << 20),
        control.CreatePort(name="svc.a", max_message_length=1, max_connect_data=1, max_pending_connects=1,
                           acl=control.AclSpec(allow_uids=(1, 2), allow_gids=(3,))),
        control.ListPorts(), control.Stats(name=""), control.PortStatus(),
    ]
    if target == "broker":
        return [bytes([1]) + encode_frame(body.TYPE, control.encode_body(body)) for body in bodies]
    replies: list[control.Body] = [
        control.ConnectionReply(accepted=True, data=b"", reason="", max_message_length=1 << 20),
        control.ErrorReply(code="busy", message="full", limit="max_connections"),
    ]
    return [control.encode_body(body) for body in replies]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--seconds", type=int, default=None)
    parser.add_argument("--artifacts", default=".", help="where a failing input is written")
    args = parser.parse_args()
    # libFuzzer ends the process with C exit(), past every Python clean-up, so
    # the corpus is removed by a parent that waits for the fuzzing child.
    corpus = tempfile.mkdtemp(prefix=f"alpc-fuzz-{args.target}-")
    try:
        for number, seed in enumerate(seeds(args.target)):
            Path(corpus, f"seed-{number}").write_bytes(seed)
        child = os.fork()
        if child == 0:
            fuzz(args, corpus)
        status = os.waitpid(child, 0)[1]
    finally:
        shutil.rmtree(corpus, ignore_errors=True)
    sys.exit(os.waitstatus_to_exitcode(status))


def fuzz(args: argparse.Namespace, corpus: str) -> None:
    """Run libFuzzer over ``corpus``; it never returns."""
    argv = [sys.argv[0], corpus, f"-artifact_prefix={args.artifacts.rstrip('/')}/", "-print_final_stats=1",
            "-max_len=4096", "-timeout=10", "-rss_limit_mb=1024"]
    if args.runs is not None:
        argv.append(f"-runs={args.runs}")
    if args.seconds is not None:
        argv.append(f"-max_total_time={args.seconds}")
    atheris.Setup(argv, TARGETS[args.target])
    atheris.Fuzz()
    os._exit(0)

if __name__ == "__main__":
    main()

"""Hostile servers for tests/test_api_validation_more.py: answers no honest alpc server sends.

Run as ``python tests/api_validation_peers.py ROLE NAME --runtime-dir DIR``. The server prints
``READY``, answers one connect with ROLE's reply and prints ``ANSWERED``, then waits for its
stdin to close (so the test decides when the connection ends).
"""

from __future__ import annotations

import argparse
import sys

import alpc
from alpc import control
from alpc.exchange import control_frame
from alpc.transport import deadline_after


def answer(role: str) -> control.ConnectionReply:
    if role == "big-accept":
        # An accept with 1 MiB of data: a server's own check stops at 512 KiB (MAX_CONNECT_DATA).
        return control.ConnectionReply(accepted=True, data=b"x" * (1 << 20), reason="", max_message_length=4096,
                                       inline_threshold=256, max_section_bytes=1 << 20)
    if role == "long-reason":
        # A rejection with a 60000-character reason: an honest server cuts it to 1024.
        return control.ConnectionReply(accepted=False, data=b"", reason="r" * 60000, max_message_length=0)
    raise SystemExit(f"unknown role {role!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    args = parser.parse_args()
    reply = answer(args.role)
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, config=config) as port:
        print("READY", flush=True)
        request = port.listen(timeout=30)
        stream = request._take_stream()
        try:
            try:
                stream.send(control_frame(reply), deadline=deadline_after(30))
            except alpc.ConnectionClosed:
                pass  # a client that refuses the reply hangs up before reading all of it
            print("ANSWERED", flush=True)
            sys.stdin.read()
        finally:
            stream.close()
            request._close_pidfd()


if __name__ == "__main__":
    main()

"""Server processes for tests/test_flow_faults.py.

``python tests/flow_fault_peers.py ROLE NAME --runtime-dir DIR [--quick]``; each prints
``READY`` once its port exists and one line per event after (tests wait on lines).
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc


def say(*parts: object) -> None:
    print(*parts, flush=True)


def _port(args: argparse.Namespace) -> alpc.ConnectionPort:
    config = alpc.Config.from_env(args.runtime_dir)
    attributes = alpc.PortAttributes(quick_lpc=True) if args.quick else None
    if attributes is None:
        return alpc.create_port(args.name, config=config)
    return alpc.create_port(args.name, attributes, config=config)


def log(args: argparse.Namespace) -> None:
    """One client: print every message in arrival order ("MSG KIND body"); answer requests."""
    with _port(args) as port:
        say("READY", os.getpid())
        comm = port.listen(timeout=30).accept()
        while True:
            message = comm.receive(timeout=30)
            if message.type is alpc.MessageType.DATAGRAM:
                say("MSG", "DGRAM", message.data.decode())
            elif message.type is alpc.MessageType.REQUEST:
                say("MSG", "REQ", message.data.decode())
                message.reply(message.data.upper())
            else:
                say("MSG", message.type.name)
                return


def callback(args: argparse.Namespace) -> None:
    """One client: send it a request, then read nothing until a stdin line; then wait for the answer."""
    with _port(args) as port:
        say("READY", os.getpid())
        comm = port.listen(timeout=30).accept()
        pending = comm.start_request(b"cb", timeout=10)
        say("SENT")
        sys.stdin.readline()
        try:
            answer = pending.result(timeout=10)
        except Exception as exc:  # reported to the test
            say("RESULT", "ERR", type(exc).__name__)
        else:
            say("RESULT", answer.data.decode())
        sys.stdin.readline()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["log", "callback"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    {"log": log, "callback": callback}[args.role](args)


if __name__ == "__main__":
    main()

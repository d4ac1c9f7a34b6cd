"""Helper processes for the broker log tests: a flood of log lines from many pids, a broker that never answers well.

Run as ``python tests/log_flood_peers.py ROLE ...``; each role prints ``READY`` or ``DONE``
lines, so tests synchronise on lines, never on sleeps.
"""

from __future__ import annotations

import os
import socket
import sys

import alpc
from alpc import control
from alpc.exchange import control_frame


def say(*parts: object) -> None:
    print(*parts, flush=True)


def flood(runtime_dir: str, children: int) -> None:
    """``children`` processes (distinct pids: each its own log-limiter key) each make the broker log
    what any local user can make a shared broker log: a CONNECT for an unknown long name (refused),
    and a port of its own, created and closed. DONE once all of them are through (or gave up)."""
    config = alpc.Config.from_env(runtime_dir)
    connect = b"".join(control_frame(control.Connect(name="svc.none." + "x" * 4000, data=b"",
                                                     max_message_length=1024, max_section_bytes=0)))
    pids = []
    for index in range(children):
        pid = os.fork()  # no threads here yet: a plain fork
        if pid == 0:
            os._exit(_make_lines(config, connect, f"svc.busy{index}." + "y" * 100))
        pids.append(pid)
    failed = sum(1 for pid in pids if os.waitpid(pid, 0)[1] != 0)
    say("DONE", failed)


def _make_lines(config: alpc.Config, connect: bytes, name: str) -> int:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)  # a broker that stalls does not answer: give up
            sock.connect(str(config.broker_socket))
            sock.sendall(connect)
            while sock.recv(65536):  # the refusal, then the broker hangs up
                pass
        alpc.create_port(name, config=config, timeout=5).close()
    except (OSError, alpc.AlpcError):
        return 1
    return 0


def main() -> None:
    role, *args = sys.argv[1:]
    if role == "flood":
        flood(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()

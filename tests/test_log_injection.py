"""Log lines quote what a peer chose (a port name) escaped and bounded: no forged lines, no terminal escapes."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

import alpc
from alpc import control
from alpc.exchange import control_frame
from alpc.logs import MAX_LIMITED_MESSAGE

pytestmark = pytest.mark.timeout(60)

FORGED = "2026-01-01 00:00:00,000 CRITICAL alpc.broker: forged by a client"


def hostile_request(config: alpc.Config, body: control.Body) -> bytes:
    """Send one raw control request, as a hostile client would; the broker's answer (up to EOF)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(config.broker_socket))
        sock.sendall(b"".join(control_frame(body)))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("journald", [False, True])
def test_a_port_name_cannot_forge_log_lines_or_flood_them(spawn, runtime_dir: Path, config: alpc.Config,
                                                          journald: bool) -> None:
    prefix = "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) " if journald else ""
    broker = spawn.argv(["sh", "-c", f"{prefix}exec {sys.executable} -m alpc --runtime-dir {runtime_dir} broker"])
    broker.expect("READY")
    # Never a valid name (the client library refuses it), but the broker only looks it up.
    name = f"svc.none\n{FORGED}\x1b]0;owned\x07\x1b[2J" + "x" * 60_000
    connect = control.Connect(name=name, data=b"", max_message_length=1024, max_section_bytes=0)
    assert b"no port named" in hostile_request(config, connect)
    assert b"no port named" in hostile_request(config, control.Peers(name=name + "p"))
    broker.proc.terminate()
    assert broker.proc.wait(10) == 0
    stderr = broker.expect_stderr("broker stopped", timeout=10)
    lines = stderr.splitlines()
    assert not [line for line in lines if FORGED in line and not line.count("no port named")], lines[:8]
    assert "\x1b" not in stderr and "\x07" not in stderr
    assert max(len(line) for line in lines) < 3 * MAX_LIMITED_MESSAGE

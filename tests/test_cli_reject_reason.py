"""`alpc` against a sick broker or a hostile server: one line on stderr, exit 1, never a hang or a forged line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import alpc

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
# What any user may pass to reject() on a port of a shared broker an operator pings: a forged
# log line under the command's own, a terminal title and a screen clear.
FORGED = "2026-01-01 00:00:00,000 CRITICAL alpc.broker: forged"
REASON = f"go away\n{FORGED}\x1b]0;owned\x07\x1b[2J"


def test_ping_prints_a_servers_reject_reason_as_one_plain_line(broker: alpc.Broker, runtime_dir: Path,
                                                               spawn) -> None:
    server = spawn("server", "svc.reject", "--reject", REASON)
    server.expect("READY")
    done = subprocess.run([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "ping", "svc.reject",
                           "--count", "1", "--timeout", "5"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    server.expect("REJECTED")
    # Was printed as it came: two lines (the second one forged) and escape sequences for the terminal.
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("alpc: ConnectionRejected: ") and "go away\\n2026" in lines[0], lines
    assert lines[0].isprintable(), lines

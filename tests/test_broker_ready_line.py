"""The broker's READY line on stdout was a blocking print: a stdout pipe already full when the
broker starts (a supervisor that reads it later, a pipe shared with another writer) held the
broker in write(2) after it bound, so it served nobody and never wrote ``--ready-fd``."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import alpc

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


def _fill(fd: int) -> bytes:
    """Fill the pipe ``fd`` writes to, to the last byte; what was written."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    written = bytearray()
    chunk = b"x" * 4096
    try:
        while True:
            try:
                written += chunk[:os.write(fd, chunk)]
            except BlockingIOError:
                if chunk == b"x":
                    return bytes(written)
                chunk = b"x"  # the last bytes of a page
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _read_all(fd: int, timeout: float) -> bytes:
    data = b""
    while select.select([fd], [], [], timeout)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"no EOF within {timeout}s: {data[-200:]!r}")


def test_a_full_stdout_pipe_does_not_keep_the_broker_from_serving(runtime_dir: Path,
                                                                   config: alpc.Config) -> None:
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    filled = _fill(out_w)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    proc = subprocess.Popen([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker",
                             "--ready-fd", str(ready_w)], stdin=subprocess.DEVNULL, stdout=out_w,
                            stderr=subprocess.DEVNULL, pass_fds=(ready_w,), cwd=ROOT)
    os.close(out_w)
    os.close(ready_w)
    try:
        # Unfixed: stuck in print() before --ready-fd is written.
        assert select.select([ready_r], [], [], 10)[0], "the broker never got ready"
        assert os.read(ready_r, 16) == b"READY\n"
        assert alpc.list_ports(config, timeout=5) == ()
        proc.send_signal(signal.SIGTERM)
        # The line is not lost: it follows what filled the pipe once someone reads.
        out = _read_all(out_r, 20)
        assert proc.wait(20) == 0
        assert out == filled + f"READY {runtime_dir / 'broker.sock'}\n".encode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
            for name in ("broker.sock", "broker.lock"):
                (runtime_dir / name).unlink(missing_ok=True)
        os.close(out_r)
        os.close(ready_r)

"""A broker whose stderr nobody reads serves on: logging never blocks its loop (README "Logs")."""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import alpc

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "log_flood_peers.py"


def read_until_eof(fd: int, timeout: float) -> bytes:
    """Everything written to the pipe ``fd`` until its last writer closed it, within ``timeout``."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no EOF within {timeout}s; read so far: {data[-2000:]!r}")
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk


def test_a_stderr_nobody_reads_never_stalls_the_broker(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    # The broker's stderr: a pipe kept open and not read (a stuck supervisor, a terminal on hold, a
    # journald that lags). Its default 64 KiB fills as the broker logs; it then blocked in write(2)
    # for good, in its only thread, and served nobody again.
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    size = fcntl.fcntl(err_w, fcntl.F_GETPIPE_SZ)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    broker = subprocess.Popen([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker",
                               "--ready-fd", str(ready_w)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=err_w, pass_fds=(ready_w,), cwd=ROOT)
    os.close(err_w)
    os.close(ready_w)
    try:
        assert select.select([ready_r], [], [], 20)[0] and os.read(ready_r, 16) == b"READY\n"
        server = spawn("server", "svc.logstall")
        server.expect("READY")
        # Any local user of a shared broker: 60 pids each asking for an unknown (long) name and
        # creating a port. The limiters let their bursts through (50 refusals of ~1.4 KiB, 50
        # created/released lines of ~400 B): more than the pipe holds.
        flood = spawn.argv([sys.executable, str(PEERS), "flood", str(runtime_dir), "60"])
        flood.expect("DONE")
        # The honest client still gets in, at once.
        with alpc.connect("svc.logstall", b"hi", config=config, timeout=10) as comm:
            assert comm.request(b"ping", timeout=10).data == b"PING"
        server.expect("ACCEPTED")
        broker.terminate()
        # Read again (a broker exits without waiting long for a reader): nothing was lost on the way
        # (the queue holds far more than these), more than the pipe could hold while nobody read it,
        # and the last lines at exit too.
        logged = read_until_eof(err_r, 20).decode()
        assert broker.wait(20) == 0
        # The limiters' budgets refill with time, so the exact count of refusals varies (~50).
        assert len(logged) > size and "no port named" in logged, len(logged)
        assert logged.rstrip().endswith("alpc.broker: broker stopped"), logged[-300:]
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait(10)
            # A broker that never got to stop leaves its socket and lock behind.
            for name in ("broker.sock", "broker.lock"):
                (runtime_dir / name).unlink(missing_ok=True)
        os.close(err_r)
        os.close(ready_r)


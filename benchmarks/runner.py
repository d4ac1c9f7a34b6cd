"""The fresh side of every measurement: one repetition in a new, pinned process pair.

The harness starts ``run_job`` in a new process (forked from a clean
forkserver, never from the harness itself, which has threads). That process
puts itself in its own process group, pins itself to the client CPU, prepares
the transport, forks the server child pinned to the server CPU, drives the
case's client side, and sends its samples back. Children die with it
(PR_SET_PDEATHSIG), so a timed-out repetition is ended by killing one group.
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .core import SYNC, Case, Job, Point, Timing, measure
from .transports.base import Buffer, Handler, Transport

__all__ = [
    "CHECK_STRIDE",
    "READY_TIMEOUT",
    "Outcome",
    "Pair",
    "fork_process",
    "make_payload",
    "measure",
    "payload_checker",
    "pin",
    "private_memory",
    "run_job",
    "stop",
]

READY_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1


@dataclass
class Outcome:
    """Raw samples (ns per operation, or bytes) and figures a case adds to its record."""

    samples: list[float]
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class Pair:
    """What a case's client driver works with: the job, its transport and the live server."""

    job: Job
    case: Case
    point: Point
    transport: Transport
    server_pid: int

    @property
    def timing(self) -> Timing:
        return self.job.timing


def pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(3)


def fork_process(cpu: int, body: Callable[[], None]) -> int:
    """Fork a child pinned to ``cpu`` that runs ``body`` and exits; it dies with this process."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        _die_with_parent(parent)
        pin(cpu)
        body()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _start_server(transport: Transport, job: Job, case: Case, handler: Handler) -> int:
    """Fork the server; returns its pid once it listens, or raises with its error."""
    ready_r, ready_w = os.pipe()

    def serve() -> None:
        os.close(ready_r)
        try:
            server = transport.server(case.server_mode, handler)
        except BaseException as exc:
            os.write(ready_w, f"E{type(exc).__name__}: {exc}".encode()[:4000])
            raise
        os.write(ready_w, b"R")
        os.close(ready_w)
        server.serve()

    pid = fork_process(job.server_cpu, serve)
    os.close(ready_w)
    try:
        # poll, not select: with 1000 pre-made channels the pipe's fd is above FD_SETSIZE.
        waiter = select.poll()
        waiter.register(ready_r, select.POLLIN)
        if not waiter.poll(READY_TIMEOUT * 1000):
            raise TimeoutError(f"the server did not start within {READY_TIMEOUT}s")
        answer = os.read(ready_r, 4096)
    finally:
        os.close(ready_r)
    if answer != b"R":
        stop(pid)
        reason = answer[1:].decode(errors="replace") if answer else "it exited"
        raise RuntimeError(f"the server failed to start: {reason}")
    return pid


@functools.lru_cache(maxsize=2)
def make_payload(size: int) -> bytes:
    """Recognisable, non-constant bytes, so a wrong or truncated echo is caught.

    Cached: the server's checker and the client of one repetition share one
    copy (256 MiB takes a while to build and to fault in).
    """
    pattern = bytes(range(256))
    if size % 256 == 0:
        return pattern * (size // 256)
    return (pattern * (size // 256 + 1))[:size]


# One byte in every this many is checked: less than a page, so every page of a
# message is touched, and prime to the payload's 256-byte period, so the
# checked bytes differ from each other.
CHECK_STRIDE = 4095


def payload_checker(size: int) -> Callable[[Buffer], None]:
    """A receiver's check that ``make_payload(size)`` arrived: raises AssertionError if not.

    The first message is compared byte for byte; every later one by length and
    one byte per CHECK_STRIDE (a strided gather, so the check costs ~1/4000 of
    the message). Every receiver of a transfer case runs it, on the bytes a
    copying transport hands over or in place on a zero-copy view alike;
    ``benchmarks/ceiling.c`` does the same.
    """
    payload = make_payload(size)
    samples = payload[::CHECK_STRIDE]
    first = True

    def check(data: Buffer) -> None:
        nonlocal first
        if len(data) != size:
            raise AssertionError(f"a {len(data)}-byte message, expected {size}")
        if first:
            if (data if isinstance(data, bytes) else bytes(data)) != payload:
                raise AssertionError("the first message differs from the payload")
            first = False
        elif memoryview(data)[::CHECK_STRIDE].tobytes() != samples:
            raise AssertionError("a message differs from the payload")

    return check


def private_memory(pid: int | None = None) -> int:
    """Bytes of memory only this process uses (Private_Clean + Private_Dirty)."""
    target = "self" if pid is None else str(pid)
    total = 0
    for line in Path(f"/proc/{target}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def max_message(case: Case, point: Point) -> int:
    reply = point.size if case.reply_size is None else case.reply_size
    return max(point.size, reply, len(SYNC), 8)


def _run_pair(job: Job, case: Case, point: Point, transport_type: type[Transport]) -> Outcome:
    transport = transport_type(job)
    channels = point.connections if case.pre_channels_per_connection else 1
    transport.prepare(channels, max_message(case, point))
    try:
        server_pid = _start_server(transport, job, case, case.handler(job))
        try:
            return case.drive(Pair(job, case, point, transport, server_pid))
        finally:
            stop(server_pid)
    finally:
        transport.cleanup()


def execute(job: Job) -> Outcome:
    from .registry import CASES, IMPLEMENTATIONS

    case = CASES[job.case]
    impl = IMPLEMENTATIONS[job.impl]
    point = Point(job.size, job.connections)
    if impl.native is not None:
        from .native import run_native

        return run_native(job, case, impl.native)
    assert impl.transport is not None
    return _run_pair(job, case, point, impl.transport)


def run_job(job: Job, results: Connection) -> None:
    """Entry point in the fresh process: run one repetition, send a result dict back."""
    os.setpgid(0, 0)
    pin(job.client_cpu)
    # Tracebacks from this process and its children go to the job's log, not the progress bar.
    log = os.open(Path(job.workdir) / "stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 2)
    os.close(log)
    result: dict[str, Any]
    try:
        outcome = execute(job)
        if not outcome.samples:
            raise RuntimeError("no samples were taken")
        result = {"status": "ok", "samples": outcome.samples, "extras": outcome.extras,
                  "client_cpus": sorted(os.sched_getaffinity(0))}
    except BaseException as exc:
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    results.send(result)
    results.close()

"""The C ceiling: build ``benchmarks/ceiling.c`` with gcc, and run it for one job.

The binary forks and pins its own server half (see the C source), using the
same warm-up and iteration rules as the Python runner, and prints one sample
per line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .core import Case, Job, Point
from .runner import Outcome, max_message

__all__ = ["BUILD_DIR", "SOURCE", "build_ceiling", "run_native"]

SOURCE = Path(__file__).resolve().parent / "ceiling.c"
BUILD_DIR = Path(__file__).resolve().parent.parent / "build" / "bench"
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
RUN_TIMEOUT = 120.0


def build_ceiling(build_dir: Path = BUILD_DIR) -> Path:
    """Compile the ceiling binary if it is missing or older than its source; returns its path.

    Raises RuntimeError naming the reason (no gcc, a compile error).
    """
    binary = build_dir / "ceiling"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        raise RuntimeError("gcc not found")
    build_dir.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name so a concurrent run never executes half a file.
    partial = build_dir / f"ceiling.{os.getpid()}.tmp"
    done = subprocess.run([compiler, *CFLAGS, "-o", str(partial), str(SOURCE)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"gcc failed: {done.stderr.strip()[-2000:]}")
    partial.replace(binary)
    return binary


def native_argv(job: Job, case: Case, mechanism: str) -> list[str]:
    if job.native_binary is None:
        raise ValueError("the harness did not build the C ceiling for this job")
    if case.native_pattern is None:
        raise ValueError(f"case {case.name} has no C ceiling pattern")
    point = Point(job.size, job.connections)
    pattern = "copy" if mechanism == "memcpy" else case.native_pattern
    reply = point.size if case.reply_size is None else case.reply_size
    timing = job.timing
    argv = [
        job.native_binary, mechanism, pattern, str(point.size), str(max(1, reply)), str(case.batch_for(point)),
        str(job.client_cpu), str(job.server_cpu), str(timing.warmup), str(int(timing.warmup_cap * 1000)),
        str(timing.min_iterations), str(timing.max_iterations), str(int(timing.time_cap * 1000)),
    ]
    if pattern == "connect":
        argv.append(str(Path(job.workdir) / "c.sock"))
    if max_message(case, point) > 1 << 34:
        raise ValueError("message too large for the C ceiling")
    return argv


def run_native(job: Job, case: Case, mechanism: str) -> Outcome:
    done = subprocess.run(native_argv(job, case, mechanism), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"ceiling exited {done.returncode}: {done.stderr.strip()[-1000:]}")
    return Outcome([float(line) for line in done.stdout.split()])

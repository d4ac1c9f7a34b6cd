"""Question: how fast do messages of each size move, from 64 B to 256 MiB?

The client sends one message of SIZE bytes; the server receives all of it,
checks it (``runner.payload_checker``) and answers with its length (8 bytes).
Time per transfer gives both the latency curve and the throughput curve. Run
alone: ``python -m benchmarks.bench_throughput``.
"""

from __future__ import annotations

from .bench_roundtrip import drive_request_reply
from .core import KIB, MIB, Case, Job, Point, Timing
from .runner import payload_checker
from .transports.base import Buffer, Handler

__all__ = ["CASE", "acknowledge_length"]


def acknowledge_length(job: Job) -> Handler:
    check = payload_checker(job.size)

    def handle(data: Buffer) -> Buffer:
        check(data)
        return len(data).to_bytes(8, "little")

    return handle


_FULL_SIZES = (64, 4 * KIB, 64 * KIB, 1 * MIB, 16 * MIB, 256 * MIB)
_QUICK_SIZES = (64, 1 * MIB)

CASE: Case = Case(
    name="throughput",
    title="Request/reply throughput by message size (SIZE request, 8 B acknowledgement)",
    unit="MiB/s",
    lower_is_better=False,
    full_points=tuple(Point(size) for size in _FULL_SIZES),
    quick_points=tuple(Point(size) for size in _QUICK_SIZES),
    full_timing=Timing(repetitions=3, warmup=200, warmup_cap=0.05, min_iterations=2, max_iterations=20_000,
                       time_cap=0.15),
    quick_timing=Timing(repetitions=1, warmup=50, warmup_cap=0.02, min_iterations=2, max_iterations=2_000,
                        time_cap=0.04),
    handler=acknowledge_length,
    drive=drive_request_reply,
    native_pattern="rr",
    varies="size",
    reply_size=8,
    byte_budget=1024 * MIB,
)

if __name__ == "__main__":
    from .harness import main

    raise SystemExit(main(cases=[CASE.name]))

"""Question: how fast do large messages stream one way, from 64 KiB to 256 MiB?

Each sample is a batch: N one-way messages of SIZE bytes (alpc datagrams),
then one SYNC request whose reply is how many messages the server received
and checked (``runner.payload_checker``), so a batch is timed until the last
message really arrived. N is 64 for small messages and shrinks so a batch
moves at most 16 MiB (never fewer than 2 messages). A sample is the batch's
time divided by N: the time per message, shown as MiB/s. Run alone:
``python -m benchmarks.bench_oneway``.
"""

from __future__ import annotations

from .core import KIB, MIB, SYNC, Case, Job, Point, Timing
from .runner import Outcome, Pair, make_payload, measure, payload_checker
from .transports.base import Buffer, Handler

__all__ = ["CASE", "count_checked_until_sync", "drive_batches"]

BATCH = 64
BATCH_BYTES = 16 * MIB


def count_checked_until_sync(job: Job) -> Handler:
    check = payload_checker(job.size)
    count = 0

    def handle(data: Buffer) -> Buffer | None:
        nonlocal count
        if len(data) == len(SYNC) and bytes(data) == SYNC:
            reply, count = count.to_bytes(8, "little"), 0
            return reply
        check(data)
        count += 1
        return None

    return handle


def drive_batches(pair: Pair) -> Outcome:
    """Time batches of one-way messages; samples are per message (batch time / N)."""
    payload = make_payload(pair.point.size)
    batch = pair.case.batch_for(pair.point)
    expected = batch.to_bytes(8, "little")
    client = pair.transport.client(0)
    try:

        def one_batch() -> None:
            if bytes(client.send_batch(payload, batch)) != expected:
                raise AssertionError("the server did not receive and check the whole batch")

        return Outcome([sample / batch for sample in measure(one_batch, pair.timing)])
    finally:
        client.close()


_FULL_SIZES = (64 * KIB, 1 * MIB, 16 * MIB, 256 * MIB)
_QUICK_SIZES = (1 * MIB,)

CASE: Case = Case(
    name="oneway",
    title=f"One-way throughput by message size (up to {BATCH} SIZE messages, then a sync request)",
    unit="MiB/s",
    lower_is_better=False,
    full_points=tuple(Point(size) for size in _FULL_SIZES),
    quick_points=tuple(Point(size) for size in _QUICK_SIZES),
    full_timing=Timing(repetitions=3, warmup=50, warmup_cap=0.05, min_iterations=2, max_iterations=5_000,
                       time_cap=0.15),
    quick_timing=Timing(repetitions=1, warmup=5, warmup_cap=0.02, min_iterations=2, max_iterations=500,
                        time_cap=0.04),
    handler=count_checked_until_sync,
    drive=drive_batches,
    native_pattern="stream",
    varies="size",
    batch=BATCH,
    batch_bytes=BATCH_BYTES,
    # 256 MiB messages: one warm-up batch and one timed batch per repetition.
    byte_budget=512 * MIB,
)

if __name__ == "__main__":
    from .harness import main

    raise SystemExit(main(cases=[CASE.name]))

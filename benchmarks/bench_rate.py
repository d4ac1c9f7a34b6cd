"""Question: how many one-way 64-byte messages per second?

Each sample is a batch: BATCH one-way messages (alpc datagrams), then one
SYNC request whose reply carries how many the server counted, so a batch is
timed until the last message is really received. gRPC sends the batch as one
client-streaming call. Run alone: ``python -m benchmarks.bench_rate``.
"""

from __future__ import annotations

from .core import SYNC, Case, Job, Point, Timing
from .runner import Outcome, Pair, make_payload, measure
from .transports.base import Buffer, Handler

__all__ = ["CASE"]

BATCH = 500


def count_until_sync(job: Job) -> Handler:
    count = 0

    def handle(data: Buffer) -> Buffer | None:
        nonlocal count
        if len(data) == job.size:
            count += 1
            return None
        if bytes(data) != SYNC:
            raise AssertionError(f"unexpected {len(data)}-byte message")
        reply, count = count.to_bytes(8, "little"), 0
        return reply

    return handle


def drive_one_way(pair: Pair) -> Outcome:
    payload = make_payload(pair.point.size)
    batch = pair.case.batch
    expected = batch.to_bytes(8, "little")
    client = pair.transport.client(0)
    try:

        def one_batch() -> None:
            if bytes(client.send_batch(payload, batch)) != expected:
                raise AssertionError("the server did not count the whole batch")

        return Outcome(measure(one_batch, pair.timing))
    finally:
        client.close()


CASE: Case = Case(
    name="rate",
    title=f"One-way message rate (64 B messages, batches of {BATCH})",
    unit="msg/s",
    lower_is_better=False,
    full_points=(Point(64),),
    quick_points=(Point(64),),
    full_timing=Timing(repetitions=5, warmup=3, warmup_cap=0.05, min_iterations=5, max_iterations=2_000,
                       time_cap=0.3),
    quick_timing=Timing(repetitions=1, warmup=1, warmup_cap=0.05, min_iterations=3, max_iterations=200,
                        time_cap=0.06),
    handler=count_until_sync,
    drive=drive_one_way,
    native_pattern="oneway",
    batch=BATCH,
)

if __name__ == "__main__":
    from .harness import main

    raise SystemExit(main(cases=[CASE.name]))

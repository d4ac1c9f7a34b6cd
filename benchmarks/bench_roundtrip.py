"""Question: what does one small request/reply round trip cost?

A 64-byte request, echoed back. Run alone: ``python -m benchmarks.bench_roundtrip [--quick]``.
"""

from __future__ import annotations

from .core import Case, Job, Point, Timing
from .runner import Outcome, Pair, make_payload
from .transports.base import Buffer, Handler

__all__ = ["CASE", "drive_request_reply"]


def echo(job: Job) -> Handler:
    def handle(data: Buffer) -> Buffer:
        return data

    return handle


def drive_request_reply(pair: Pair) -> Outcome:
    """Time ``client.request(payload)``; every reply is checked, the first one byte for byte."""
    size = pair.point.size
    payload = make_payload(size)
    reply_size = size if pair.case.reply_size is None else pair.case.reply_size
    expected = payload if pair.case.reply_size is None else size.to_bytes(8, "little")
    client = pair.transport.client(0)
    try:
        first = client.request(payload)
        if bytes(first) != expected:
            raise AssertionError(f"wrong reply: {len(first)} bytes, expected {len(expected)}")

        def check(reply: Buffer) -> None:
            if len(reply) != reply_size:
                raise AssertionError("a reply had the wrong length")

        return Outcome(client.time_requests(payload, check, pair.timing))
    finally:
        client.close()


CASE: Case = Case(
    name="roundtrip",
    title="Small-message round trip (64 B request, 64 B reply)",
    unit="us",
    lower_is_better=True,
    full_points=(Point(64),),
    quick_points=(Point(64),),
    full_timing=Timing(repetitions=5, warmup=500, warmup_cap=0.05, min_iterations=100, max_iterations=50_000,
                       time_cap=0.3),
    quick_timing=Timing(repetitions=1, warmup=100, warmup_cap=0.02, min_iterations=50, max_iterations=5_000,
                        time_cap=0.06),
    handler=echo,
    drive=drive_request_reply,
    native_pattern="rr",
)

if __name__ == "__main__":
    from .harness import main

    raise SystemExit(main(cases=[CASE.name]))

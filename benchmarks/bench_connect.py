"""Question: how long from "connect" to the first reply on a new connection?

Each operation opens a new connection, sends a 64-byte request and waits for
the reply; closing happens outside the clock. For alpc this includes the
broker hop and the server's accept. Run alone: ``python -m benchmarks.bench_connect``.
"""

from __future__ import annotations

from .bench_roundtrip import echo
from .core import Case, Point, Timing
from .runner import Outcome, Pair, make_payload, measure
from .transports.base import Client

__all__ = ["CASE"]


def drive_connect(pair: Pair) -> Outcome:
    payload = make_payload(pair.point.size)

    def connect_and_ask() -> Client:
        client = pair.transport.client(0)
        if len(client.request(payload)) != len(payload):
            raise AssertionError("the first reply had the wrong length")
        return client

    def close(client: Client) -> None:
        client.close()

    return Outcome(measure(connect_and_ask, pair.timing, untimed=close))


CASE: Case = Case(
    name="connect",
    title="Connect + accept + first 64 B round trip",
    unit="us",
    lower_is_better=True,
    full_points=(Point(64),),
    quick_points=(Point(64),),
    full_timing=Timing(repetitions=5, warmup=20, warmup_cap=0.05, min_iterations=20, max_iterations=2_000,
                       time_cap=0.3),
    quick_timing=Timing(repetitions=1, warmup=5, warmup_cap=0.05, min_iterations=10, max_iterations=300,
                        time_cap=0.06),
    handler=echo,
    drive=drive_connect,
    server_mode="many",
    native_pattern="connect",
)

if __name__ == "__main__":
    from .harness import main

    raise SystemExit(main(cases=[CASE.name]))

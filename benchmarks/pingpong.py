"""What the one-question ping-pong measurements (identity_cost, socket_floor) share.

Each forks an answering process, then times round trips from the caller pinned to
one CPU; the harness's convention for the CPUs: ``same`` = both on the first
allowed CPU, ``split`` = client on the second, server on the first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

__all__ = ["arguments", "pinnings", "time_round_trips"]


def arguments(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """``--rounds`` (per repetition) and ``--reps``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=5)
    return parser.parse_args(argv)


def pinnings() -> dict[str, tuple[int, int]]:
    """(client CPU, server CPU) by pinning; ``split`` only where two CPUs are allowed."""
    allowed = sorted(os.sched_getaffinity(0))
    cpus = {"same": (allowed[0], allowed[0])}
    if len(allowed) > 1:
        cpus["split"] = (allowed[1], allowed[0])
    return cpus


def time_round_trips(ask: Callable[[], None], rounds: int, warm_up: int, cpu: int) -> float:
    """Median microseconds of ``ask()`` over ``rounds`` after ``warm_up`` untimed ones, the
    caller pinned to ``cpu`` meanwhile (and given its CPUs back after)."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    samples = []
    try:
        for number in range(rounds + warm_up):
            started = time.perf_counter_ns()
            ask()
            if number >= warm_up:
                samples.append(time.perf_counter_ns() - started)
    finally:
        os.sched_setaffinity(0, allowed)
    return statistics.median(samples) / 1000

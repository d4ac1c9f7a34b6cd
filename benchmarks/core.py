"""The vocabulary every benchmark shares: cases, points, timing budgets, jobs, statistics.

Nothing here starts a process or touches a transport; the harness (scheduling,
parent side) and the runner (the fresh process pair) both build on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .runner import Outcome, Pair
    from .transports.base import Handler, ServerMode

__all__ = [
    "CPU_PINNINGS",
    "KIB",
    "MIB",
    "SYNC",
    "Case",
    "Job",
    "Pinning",
    "Point",
    "Sampler",
    "Timing",
    "format_size",
    "measure",
    "percentile",
]

KIB = 1024
MIB = 1024 * KIB

Pinning = Literal["same", "split"]
CPU_PINNINGS: tuple[Pinning, ...] = ("same", "split")

# The one-way pattern ends each batch with this request; it is shorter than any
# measured message, so a server tells it apart by length alone.
SYNC = b"sync"


@dataclass(frozen=True)
class Timing:
    """How long one repetition may run.

    Warm-up stops at ``warmup`` iterations or ``warmup_cap`` seconds, whichever
    comes first. Measurement runs at least ``min_iterations`` and then stops at
    ``max_iterations`` or once ``time_cap`` seconds have passed.
    """

    repetitions: int
    warmup: int
    warmup_cap: float
    min_iterations: int
    max_iterations: int
    time_cap: float

    def scaled_for(self, size: int, byte_budget: int | None) -> Timing:
        """Fewer iterations for large messages: at most ``byte_budget`` bytes per repetition.

        Where that leaves only a handful of transfers (256 MiB messages), two
        repetitions are enough to show the spread and keep the full run short.
        """
        if byte_budget is None:
            return self
        by_bytes = max(1, byte_budget // max(size, 1))
        return Timing(
            repetitions=self.repetitions if by_bytes >= 8 else min(self.repetitions, 2),
            warmup=max(1, min(self.warmup, by_bytes // 4)),
            warmup_cap=self.warmup_cap,
            min_iterations=max(1, min(self.min_iterations, by_bytes)),
            max_iterations=max(1, min(self.max_iterations, by_bytes)),
            time_cap=self.time_cap,
        )


class Sampler:
    """A timing's bounds for a loop that times its own operations::

        sampler = Sampler(timing)
        while sampler.warming():
            op()
        while sampler.sampling():
            started = time.perf_counter_ns(); op(); sampler.add(time.perf_counter_ns() - started)

    so a synchronous loop and one awaiting inside an event loop stop alike.
    """

    def __init__(self, timing: Timing) -> None:
        self._timing = timing
        self._warmups = 0
        self._warm_until = time.perf_counter_ns() + int(timing.warmup_cap * 1e9)
        self._stop_at: int | None = None
        self.samples: list[float] = []

    def warming(self) -> bool:
        """True while another warm-up operation is due."""
        if self._warmups >= self._timing.warmup or (self._warmups and time.perf_counter_ns() >= self._warm_until):
            return False
        self._warmups += 1
        return True

    def sampling(self) -> bool:
        """True while another timed operation is due."""
        timing = self._timing
        now = time.perf_counter_ns()
        if self._stop_at is None:
            self._stop_at = now + int(timing.time_cap * 1e9)
        count = len(self.samples)
        return count < timing.max_iterations and (count < timing.min_iterations or now < self._stop_at)

    def add(self, nanoseconds: float) -> None:
        self.samples.append(nanoseconds)


def measure(op: Callable[[], Any], timing: Timing, untimed: Callable[[Any], None] | None = None) -> list[float]:
    """Warm up, then time ``op`` (ns each) within the timing's iteration and time bounds.

    ``untimed`` gets what ``op`` returned, outside the clock (closing a connection).
    """
    clock = time.perf_counter_ns
    sampler = Sampler(timing)
    while sampler.warming():
        result = op()
        if untimed is not None:
            untimed(result)
    while sampler.sampling():
        started = clock()
        result = op()
        sampler.add(clock() - started)
        if untimed is not None:
            untimed(result)
    return sampler.samples


@dataclass(frozen=True)
class Point:
    """One x value of a case: the message size and, where it matters, how many connections."""

    size: int
    connections: int = 1

    def label(self, case: Case) -> str:
        if case.varies == "connections":
            noun = "clients" if case.name == "scaling" else "conns"
            return f"{self.connections} {noun}"
        return format_size(self.size)


@dataclass(frozen=True)
class Case:
    """One question the benchmarks answer, defined by its ``bench_*.py`` script.

    ``handler`` makes the server's message handler, ``drive`` runs the client
    side in the fresh process pair and returns raw samples (``raw_unit`` per
    operation), which ``convert`` turns into the ``unit`` the table shows.
    ``native_pattern`` names the pattern the C ceiling runs for this case.
    """

    name: str
    title: str
    unit: str
    lower_is_better: bool
    full_points: tuple[Point, ...]
    quick_points: tuple[Point, ...]
    full_timing: Timing
    quick_timing: Timing
    handler: Callable[[Job], Handler]
    drive: Callable[[Pair], Outcome]
    server_mode: ServerMode = "single"
    native_pattern: str | None = None
    varies: Literal["size", "connections", "none"] = "none"
    # The server answers a request with this many bytes; None echoes the request.
    reply_size: int | None = None
    # Messages per sample in the one-way pattern.
    batch: int = 1
    # For one-way transfers of large messages: at most this many bytes per batch
    # (the batch shrinks with the size, never below 2 messages); see batch_for.
    batch_bytes: int | None = None
    # Caps bytes moved per repetition, so 256 MiB cases stay within budget.
    byte_budget: int | None = None
    pinnings: tuple[Pinning, ...] = CPU_PINNINGS
    raw_unit: Literal["ns", "bytes"] = "ns"
    # One pre-made channel per connection (scaling); otherwise one.
    pre_channels_per_connection: bool = False

    def points(self, quick: bool) -> tuple[Point, ...]:
        return self.quick_points if quick else self.full_points

    def batch_for(self, point: Point) -> int:
        """Messages per one-way batch at ``point``: ``batch``, fewer for large messages."""
        if self.batch_bytes is None:
            return self.batch
        return max(2, min(self.batch, self.batch_bytes // max(point.size, 1)))

    def timing(self, quick: bool, point: Point) -> Timing:
        base = self.quick_timing if quick else self.full_timing
        # A sample of a one-way transfer moves a whole batch.
        per_sample = point.size * (self.batch_for(point) if self.batch_bytes is not None else 1)
        return base.scaled_for(per_sample, self.byte_budget)

    def convert(self, raw: float, point: Point) -> float:
        """A raw sample (ns per operation, or bytes) in the unit the table shows."""
        if self.raw_unit == "bytes":
            return raw / KIB
        if self.unit == "us":
            return raw / 1e3
        if self.unit == "ms":
            return raw / 1e6
        if self.unit == "MiB/s":
            return point.size / MIB / (raw / 1e9) if raw > 0 else math.inf
        if self.unit == "msg/s":
            return self.batch / (raw / 1e9) if raw > 0 else math.inf
        raise ValueError(f"case {self.name}: unknown unit {self.unit!r}")


@dataclass(frozen=True)
class Job:
    """One repetition of one implementation at one point: what a fresh process pair runs."""

    case: str
    impl: str
    size: int
    connections: int
    pinning: Pinning
    client_cpu: int
    server_cpu: int
    repetition: int
    timing: Timing
    workdir: str
    # A unique token for names this job creates (ports, /dev/shm objects).
    tag: str
    alpc_runtime_dir: str | None = None
    native_binary: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    fraction = rank - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * fraction)


def format_size(size: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"

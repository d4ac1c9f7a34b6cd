"""The speed targets the issues set, checked against one run's records (same run, per pinning).

A target compares one implementation with a reference in the same case, size
and pinning, as a ratio of medians: ``speed`` is how many times faster the
implementation is (rate over rate, or time over time inverted) and must be at
least ``bound``; ``time`` is the implementation's time as a multiple of the
reference's and must be at most ``bound``; ``at_most`` has no reference: the
implementation's own median (in the case's unit) must be at most ``bound``.
Nothing asserts them: the report shows each ratio and whether it was met, and
says so when the run tried a target but could not evaluate it (its figure or
its reference failed or was skipped), so a missing figure never hides a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .core import KIB, MIB, format_size

__all__ = ["TARGETS", "Target", "target_rows"]

_LARGE = (64 * KIB, 1 * MIB, 16 * MIB, 256 * MIB)


@dataclass(frozen=True)
class Target:
    source: str
    case: str
    sizes: tuple[int, ...]
    impl: str
    reference: str
    measure: Literal["speed", "time", "at_most"]
    bound: float
    # Where the target applies (some are set for one pinning only).
    pinnings: tuple[str, ...] = ("same", "split")

    def describe(self) -> str:
        if self.measure == "at_most":
            return f"{self.impl} <= {self.bound:g}"
        if self.measure == "speed":
            return f"{self.impl} >= {self.bound:g}x {self.reference}"
        return f"{self.impl} time <= {self.bound:g}x {self.reference}"


TARGETS: tuple[Target, ...] = (
    # Issue 4: the automatic section path against the C shared-memory copy
    # ceiling and multiprocessing.Pipe; the view path against the in-place ceiling.
    *(Target("issue 4", case, _LARGE, "alpc", "c-futex", "speed", 0.8) for case in ("throughput", "oneway")),
    *(Target("issue 4", case, (1 * MIB,), "alpc", "mp.Pipe", "speed", 5.0) for case in ("throughput", "oneway")),
    *(Target("issue 4", case, _LARGE, "alpc-view", "c-inplace", "speed", 0.8) for case in ("throughput", "oneway")),
    # Issue 7: an RPC call against the raw alpc request and grpcio over a unix socket.
    Target("issue 7", "roundtrip", (64,), "alpc-rpc", "alpc", "time", 1.3),
    # The same against the raw request on the transport an rpc.Server's connections use: its
    # threads wait() on every connection at once, which ends a default port's Quick-LPC offer,
    # while ``alpc`` is a thread blocked on one connection (the rings, where the kernel attests).
    Target("issue 7", "roundtrip", (64,), "alpc-rpc", "alpc-socket", "time", 1.3),
    Target("issue 7", "roundtrip", (64,), "alpc-rpc", "grpc", "speed", 5.0),
    # Issue 6: the default path against the raw socketpair and multiprocessing.Pipe
    # ("faster than": time at most 1x), batched datagrams against mp.Pipe's rate,
    # and an idle connection's memory (the case measures server and client together).
    Target("issue 6", "roundtrip", (64,), "alpc", "socketpair", "time", 1.1),
    Target("issue 6", "roundtrip", (64,), "alpc", "mp.Pipe", "time", 1.0),
    Target("issue 6", "rate", (64,), "alpc-batch", "mp.Pipe", "speed", 5.0),
    Target("issue 6", "memory", (64,), "alpc", "", "at_most", 64.0, pinnings=("same",)),
    # Issue 6: Quick-LPC's lean calls against the raw socketpair across CPUs,
    # and against the C futex ping-pong on one CPU.
    Target("issue 6", "roundtrip", (64,), "alpc-quick", "socketpair", "speed", 20.0, pinnings=("split",)),
    Target("issue 6", "roundtrip", (64,), "alpc-quick", "c-futex", "time", 2.0, pinnings=("same",)),
)


def _ratio(target: Target, impl: dict[str, Any], ref: dict[str, Any]) -> float:
    faster: float = impl["median"] / ref["median"]
    if impl["lower_is_better"]:
        faster = 1 / faster
    return faster if target.measure == "speed" else 1 / faster


def _not_measured(target: Target, tried: dict[tuple[Any, ...], dict[str, Any]], size: int,
                  pinning: str) -> str | None:
    """Why a target the run tried at this point has no figure (a side failed or was skipped), or None."""
    names = (target.impl,) if target.measure == "at_most" else (target.impl, target.reference)
    records = [tried.get((target.case, size, pinning, name)) for name in names]
    if None in records:  # the run did not have both sides in it (--impl alpc alone): nothing was tried
        return None
    for name, record in zip(names, records, strict=True):
        if record is not None and not (record["status"] == "ok" and record["median"]):
            return f"**not measured**: {name} {record['status']} ({record.get('reason')})"
    return None


def target_rows(records: Sequence[dict[str, Any]],
                targets: Sequence[Target] = TARGETS) -> list[list[str]]:
    """One row per target, size and pinning that the run tried: what, where, ratio, met.

    A target whose figure or reference failed or was skipped gets a row saying so
    (a vanished row would read as "nothing to check"); one the run never tried has none.
    """
    tried = {(r["case"], r["size"], r["pinning"], r["implementation"]): r for r in records}
    ok = {key: r for key, r in tried.items() if r["status"] == "ok" and r["median"]}
    pinnings = sorted({r["pinning"] for r in records}, key=("same", "split").index)
    rows = []
    for target in targets:
        for size in target.sizes:
            for pinning in pinnings:
                if pinning not in target.pinnings:
                    continue
                why = _not_measured(target, tried, size, pinning)
                if why is not None:
                    rows.append([target.source, target.describe(), target.case, format_size(size), pinning, "-",
                                 why])
                    continue
                impl = ok.get((target.case, size, pinning, target.impl))
                if impl is None:
                    continue
                if target.measure == "at_most":
                    value = impl["median"]
                    rows.append([target.source, target.describe(), target.case, format_size(size), pinning,
                                 f"{value:.3g} {impl['unit']}", "yes" if value <= target.bound else "**no**"])
                    continue
                ref = ok.get((target.case, size, pinning, target.reference))
                if ref is None:
                    continue
                ratio = _ratio(target, impl, ref)
                met = ratio >= target.bound if target.measure == "speed" else ratio <= target.bound
                rows.append([target.source, target.describe(), target.case, format_size(size), pinning,
                             f"{ratio:.2f}x", "yes" if met else "**no**"])
    return rows

"""The PNG: latency and throughput against message size, alpc against its peers.

Drawn from the throughput case's records (time per transfer and MiB/s), one
row per CPU pinning. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core import format_size

__all__ = ["plot_results"]

_CASE = "throughput"
_PINNINGS = ("same", "split")
_ALPC_LINES = (("-", "o"), ("--", "s"), (":", "^"))


def _series(records: Sequence[dict[str, Any]], pinning: str) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["case"] == _CASE and record["pinning"] == pinning and record["status"] == "ok":
            series.setdefault(record["implementation"], []).append(record)
    for points in series.values():
        points.sort(key=lambda r: r["size"])
    return series


def _styles(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One fixed style per implementation across all panels: alpc bold black, ceilings dashed."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    kinds = {r["implementation"]: r["kind"] for r in records if r["case"] == _CASE}
    styles: dict[str, dict[str, Any]] = {}
    others = 0
    variants = 0
    for name in sorted(kinds):
        if kinds[name] == "alpc":
            # alpc and its variants (alpc-view, alpc-rpc): bold black, told apart by line and marker.
            line, marker = _ALPC_LINES[variants % len(_ALPC_LINES)]
            styles[name] = {"color": "black", "linewidth": 2.8 if variants == 0 else 2.0, "linestyle": line,
                            "marker": marker, "zorder": 5}
            variants += 1
            continue
        style: dict[str, Any] = {"color": palette(others % palette.N), "linewidth": 1.2, "marker": "."}
        if kinds[name] == "ceiling":
            style.update(linestyle="--", linewidth=1.0)
        styles[name] = style
        others += 1
    return styles


def _size_ticks(axis: Any, sizes: list[int]) -> None:
    axis.set_xticks(sizes)
    axis.set_xticklabels([format_size(size).replace(" ", "\u00a0") for size in sizes], fontsize=8)
    axis.minorticks_off()


def plot_results(records: Sequence[dict[str, Any]], path: Path, subtitle: str) -> Path | None:
    """Write the plot to ``path``; None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pinnings = [p for p in _PINNINGS if _series(records, p)]
    if not pinnings:
        return None
    styles = _styles(records)
    fig, axes = plt.subplots(len(pinnings), 2, figsize=(13, 5 * len(pinnings)), squeeze=False)
    for row, pinning in enumerate(pinnings):
        latency, throughput = axes[row]
        all_sizes: set[int] = set()
        for name, points in sorted(_series(records, pinning).items()):
            sizes = [p["size"] for p in points]
            all_sizes.update(sizes)
            style = styles[name]
            # A lone memcpy is no round trip: it belongs on the throughput side only.
            if name != "c-memcpy":
                latency.plot(sizes, [p["extras"]["median_ns"] / 1000 for p in points], label=name, **style)
            throughput.plot(sizes, [p["median"] for p in points], label=name, **style)
        latency.set_title(f"time per transfer, {pinning} CPU")
        latency.set_ylabel("median us (SIZE request + 8 B ack)")
        throughput.set_title(f"throughput, {pinning} CPU")
        throughput.set_ylabel("median MiB/s")
        for axis in (latency, throughput):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            _size_ticks(axis, sorted(all_sizes))
            axis.set_xlabel("message size")
            axis.grid(True, which="major", alpha=0.3)
        throughput.legend(fontsize=8, loc="best")
    fig.suptitle(f"alpc against its peers: {subtitle}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

"""The benchmark harness cannot rot: a tiny quick run end to end, and its JSON schema.

No timing is asserted: only that every figure is there, well-formed and
measured the way the record says (pinning, repetitions, implementation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import harness, registry, report
from benchmarks.core import Point, percentile
from benchmarks.registry import Impl
from benchmarks.transports.sockets import SocketPairTransport

ROOT = Path(__file__).resolve().parent.parent

# The record schema the README and the plot rely on: field -> allowed types.
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "case": (str,),
    "title": (str,),
    "implementation": (str,),
    "kind": (str,),
    "size": (int,),
    "connections": (int,),
    "pinning": (str,),
    "cpus": (dict, type(None)),
    "unit": (str,),
    "lower_is_better": (bool,),
    "status": (str,),
    "reason": (str, type(None)),
    "median": (float, type(None)),
    "p99": (float, type(None)),
    "min": (float, type(None)),
    "max": (float, type(None)),
    "repetitions": (int,),
    "samples": (int,),
    "seconds": (float,),
    "extras": (dict,),
    "machine": (dict,),
    "commit": (str,),
    "timestamp": (str,),
}


def check_record(record: dict[str, Any]) -> None:
    assert set(record) == set(RECORD_FIELDS), set(record) ^ set(RECORD_FIELDS)
    for name, types in RECORD_FIELDS.items():
        assert isinstance(record[name], types), (name, record[name])
    assert record["status"] in ("ok", "skipped", "error")
    assert record["kind"] in ("alpc", "peer", "ceiling")
    assert record["pinning"] in ("same", "split")
    assert {"cpu", "cpus", "kernel", "python", "alpc_path"} <= set(record["machine"])


def test_quick_run_writes_table_json_and_markdown(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--case", "roundtrip", "--impl", "alpc",
            "--impl", "socketpair", "--impl", "c-uds", "--reps", "1", "--out", str(tmp_path), "--no-plot",
            "--no-progress"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| roundtrip | 64 B |" in done.stdout
    assert "socketpair" in done.stdout
    assert "x slower" in done.stdout or "x faster" in done.stdout

    document = json.loads((tmp_path / "latest.json").read_text())
    assert document["schema"] == report.SCHEMA_VERSION
    assert document["quick"] is True
    assert set(document["load_average"]) == {"start", "end"}
    records = document["records"]
    for record in records:
        check_record(record)
        assert record["status"] == "ok", record["reason"]
        assert record["case"] == "roundtrip" and record["unit"] == "us" and record["size"] == 64
        assert record["repetitions"] == 1 and record["samples"] > 0
        assert 0 < record["min"] <= record["max"]
        assert 0 < record["median"] <= record["p99"]
        assert record["commit"] == document["commit"]
    expected_path = "python" if os.environ.get("ALPC_PUREPYTHON") == "1" else "c"
    assert document["machine"]["alpc_path"] == expected_path
    cells = {(r["implementation"], r["pinning"]) for r in records}
    pinnings = {"same", "split"} if len(os.sched_getaffinity(0)) > 1 else {"same"}
    assert cells == {(impl, pin) for impl in ("alpc", "socketpair", "c-uds") for pin in pinnings}
    for record in records:
        cpus = record["cpus"]
        assert (cpus["client"] == cpus["server"]) == (record["pinning"] == "same")
    markdown = (tmp_path / "latest.md").read_text()
    assert "| case | size | CPUs (client/server) | alpc |" in markdown
    assert "## Every implementation" in markdown


def test_a_missing_peer_is_reported_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    ghost = Impl("ghost", "peer", SocketPairTransport, frozenset({"roundtrip"}),
                 requires=("no_such_module_for_alpc_bench",), install_hint="pip install ghost")
    monkeypatch.setitem(registry.IMPLEMENTATIONS, "ghost", ghost)
    monkeypatch.setattr(harness, "implementations_for", lambda case: [ghost])
    cells = harness.plan(harness.Options(quick=True, cases=["roundtrip"], impls=["ghost"]))
    assert cells and all(c.skip_reason and "no_such_module_for_alpc_bench" in c.skip_reason for c in cells)
    meta = {"generated": "now", "commit": "abc", "machine": {"cpu": "x", "cpus": 2, "kernel": "k", "python": "3",
                                                             "alpc_path": "c", "memory_gib": 1}}
    records = [harness._record(cell, meta) for cell in cells]
    for record in records:
        check_record(record)
        assert record["status"] == "skipped" and record["median"] is None
    markdown = report.render_markdown({**meta, "quick": True, "wall_seconds": 0.0}, records)
    assert "ghost (skipped): no_such_module_for_alpc_bench is not installed; install with pip install ghost" \
        in markdown


def _fake(impl: str, kind: str, median: float, unit: str = "us", lower: bool = True) -> dict[str, Any]:
    return {"case": "roundtrip", "size": 64, "connections": 1, "pinning": "same", "cpus": {"client": 0, "server": 0},
            "implementation": impl, "kind": kind, "status": "ok", "reason": None, "median": median,
            "p99": median * 2, "min": median, "max": median, "unit": unit, "lower_is_better": lower,
            "repetitions": 1}


def test_summary_ratio_compares_alpc_with_the_best_peer_only() -> None:
    records = [_fake("alpc", "alpc", 30.0), _fake("slow", "peer", 60.0), _fake("fast", "peer", 10.0),
               _fake("c", "ceiling", 1.0)]
    row = report.summary_table(records).splitlines()[2]
    assert "| fast | 10.0 us | 3.00x slower | 1.00 us (c) |" in row
    rates = [_fake("alpc", "alpc", 200.0, "msg/s", False), _fake("peer", "peer", 100.0, "msg/s", False)]
    assert "2.00x faster" in report.summary_table(rates)


def test_percentile_and_rate_conversion() -> None:
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    throughput = registry.CASES["throughput"]
    # 1 MiB moved in 1 ms is 1000 MiB/s.
    assert throughput.convert(1e6, Point(1024 * 1024)) == pytest.approx(1000.0)
    rate = registry.CASES["rate"]
    assert rate.convert(1e9, Point(64)) == pytest.approx(rate.batch)


def test_update_readme_replaces_only_the_marked_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{report.README_BEGIN}\nold table\n{report.README_END}\n\nafter\n")
    meta = {"generated": "2026-01-01 00:00 UTC", "commit": "abc123", "quick": False, "wall_seconds": 300.0,
            "machine": {"cpu": "AMD EPYC", "cpus": 2, "memory_gib": 24, "kernel": "6.1", "python": "3.11.7",
                        "alpc_path": "c"}}
    records = [_fake("alpc", "alpc", 30.0), _fake("fast", "peer", 10.0)]
    for _ in range(2):
        report.update_readme(readme, meta, records)
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith(f"{report.README_END}\n\nafter\n")
    assert text.count("| case | size |") == 1
    assert "at commit `abc123`" in text and "AMD EPYC, 2 CPUs" in text and "3.00x slower" in text

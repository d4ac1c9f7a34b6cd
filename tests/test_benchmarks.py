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

from alpc import _native
from benchmarks import harness, native, registry, report, targets
from benchmarks.core import Point, Sampler, Timing, percentile
from benchmarks.registry import Impl
from benchmarks.runner import CHECK_STRIDE, make_payload, payload_checker
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


def test_new_transfer_and_rpc_rows_run_end_to_end(tmp_path: Path) -> None:
    """alpc-view and the C ceilings in the one-way case; alpc-rpc, alpc-aio (timed inside its event loop) and
    mp.managers in the round trip."""
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--case", "oneway", "--case", "roundtrip",
            "--impl", "alpc", "--impl", "alpc-view", "--impl", "alpc-rpc", "--impl", "alpc-aio",
            "--impl", "mp.managers", "--impl", "c-futex", "--impl", "c-inplace", "--pinning", "same", "--reps", "1",
            "--out", str(tmp_path), "--no-plot", "--no-progress"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((tmp_path / "latest.json").read_text())["records"]
    cells = {(r["case"], r["implementation"]) for r in records}
    assert cells == {("oneway", "alpc"), ("oneway", "alpc-view"), ("oneway", "c-futex"), ("oneway", "c-inplace"),
                     ("roundtrip", "alpc"), ("roundtrip", "alpc-rpc"), ("roundtrip", "alpc-aio"),
                     ("roundtrip", "mp.managers"), ("roundtrip", "c-futex")}
    for record in records:
        check_record(record)
        assert record["status"] == "ok", record["reason"]
        assert record["median"] > 0 and record["samples"] > 0
    # Every target with both sides measured gets a row; the one-way ones here, and RPC against raw alpc.
    assert "| issue 4 | alpc-view >= 0.8x c-inplace | oneway | 1 MiB | same |" in done.stdout
    assert "| issue 7 | alpc-rpc time <= 1.3x alpc | roundtrip | 64 B | same |" in done.stdout


def test_a_sampler_keeps_the_warm_up_and_iteration_bounds_of_its_timing() -> None:
    """The bounds measure() and the asyncio client's own loop share."""
    sampler = Sampler(Timing(repetitions=1, warmup=3, warmup_cap=60.0, min_iterations=2, max_iterations=5,
                             time_cap=60.0))
    assert sum(1 for _ in iter(sampler.warming, False)) == 3
    while sampler.sampling():
        sampler.add(1.0)
    assert sampler.samples == [1.0] * 5
    # Caps already passed: one warm-up operation, then the minimum number of samples.
    capped = Sampler(Timing(repetitions=1, warmup=100, warmup_cap=0.0, min_iterations=2, max_iterations=1000,
                            time_cap=0.0))
    assert sum(1 for _ in iter(capped.warming, False)) == 1
    while capped.sampling():
        capped.add(2.0)
    assert capped.samples == [2.0, 2.0]


@pytest.mark.parametrize("mechanism,pattern", [("futex", "rr"), ("futex", "stream"), ("inplace", "rr"),
                                               ("inplace", "stream"), ("uds", "rr")])
def test_ceiling_patterns_give_one_sample_per_iteration(mechanism: str, pattern: str) -> None:
    binary = native.build_ceiling()
    cpu = min(os.sched_getaffinity(0))
    size, batch, iterations = 3 * 4096 + 17, 4, 5
    argv = [str(binary), mechanism, pattern, str(size), "8", str(batch), str(cpu), str(cpu), "2", "50",
            str(iterations), str(iterations), "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    samples = [float(line) for line in done.stdout.split()]
    assert len(samples) == iterations and all(s > 0 for s in samples)


def test_payload_checker_checks_first_message_fully_and_later_ones_by_sample() -> None:
    size = 3 * CHECK_STRIDE + 5
    payload = make_payload(size)
    check = payload_checker(size)
    with pytest.raises(AssertionError, match="first message"):
        check(payload[:-1] + b"\xff")
    check(memoryview(payload))  # the first good message, as a zero-copy receiver sees it
    check(bytearray(payload))
    with pytest.raises(AssertionError, match="expected"):
        check(payload[:-1])
    sampled = bytearray(payload)
    sampled[2 * CHECK_STRIDE] ^= 0xFF
    with pytest.raises(AssertionError, match="differs"):
        check(sampled)
    # Between samples a later message is not compared: the check costs ~1/4000 of the message.
    between = bytearray(payload)
    between[1] ^= 0xFF
    check(between)


def test_one_way_batches_shrink_with_size_and_count_in_the_time_budget() -> None:
    oneway = registry.CASES["oneway"]
    assert oneway.batch_for(Point(64 * 1024)) == oneway.batch
    assert oneway.batch_for(Point(1024 * 1024)) == 16
    assert oneway.batch_for(Point(256 * 1024 * 1024)) == 2
    assert registry.CASES["rate"].batch_for(Point(64)) == registry.CASES["rate"].batch
    # A 256 MiB batch moves 512 MiB: one warm-up and one timed batch.
    timing = oneway.timing(False, Point(256 * 1024 * 1024))
    assert (timing.warmup, timing.min_iterations, timing.max_iterations) == (1, 1, 1)
    # Samples are per message, so MiB/s is the message size over the sample.
    assert oneway.convert(1e6, Point(1024 * 1024)) == pytest.approx(1000.0)


def test_targets_compare_with_the_named_reference_per_pinning() -> None:
    def transfer(impl: str, kind: str, median: float, pinning: str) -> dict[str, Any]:
        return {**_fake(impl, kind, median, "MiB/s", False), "case": "oneway", "size": 1024 * 1024,
                "pinning": pinning}

    records = [transfer("alpc", "alpc", 900.0, "same"), transfer("c-futex", "ceiling", 1000.0, "same"),
               transfer("alpc", "alpc", 500.0, "split"), transfer("c-futex", "ceiling", 1000.0, "split"),
               transfer("mp.Pipe", "peer", 100.0, "same"),
               _fake("alpc", "alpc", 40.0), _fake("alpc-rpc", "alpc", 60.0), _fake("grpc", "peer", 300.0)]
    rows = {(row[1], row[2], row[4]): (row[5], row[6]) for row in targets.target_rows(records)}
    assert rows[("alpc >= 0.8x c-futex", "oneway", "same")] == ("0.90x", "yes")
    assert rows[("alpc >= 0.8x c-futex", "oneway", "split")] == ("0.50x", "**no**")
    assert rows[("alpc >= 5x mp.Pipe", "oneway", "same")] == ("9.00x", "yes")
    assert rows[("alpc-rpc time <= 1.3x alpc", "roundtrip", "same")] == ("1.50x", "**no**")
    assert rows[("alpc-rpc >= 5x grpc", "roundtrip", "same")] == ("5.00x", "yes")
    # Nothing for a target whose reference was not measured.
    assert not any(key[0].startswith("alpc-view") for key in rows)


def test_an_absolute_target_compares_the_median_with_its_bound() -> None:
    def memory(median: float) -> dict[str, Any]:
        return {**_fake("alpc", "alpc", median, "KiB"), "case": "memory", "size": 64, "connections": 200}

    for median, met in ((33.2, "yes"), (70.0, "**no**")):
        rows = {(row[1], row[2]): (row[5], row[6]) for row in targets.target_rows([memory(median)])}
        assert rows[("alpc <= 64", "memory")] == (f"{median:.3g} KiB", met)


@pytest.mark.skipif(_native.sock_send is None, reason="it measures alpc's C calls")
def test_the_socket_floor_runs_every_ping_pong(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import socket_floor

    allowed = os.sched_getaffinity(0)
    for way in socket_floor.WAYS:
        assert socket_floor.measure(way, 200, (min(allowed), max(allowed))) > 0
    assert socket_floor.main(["--rounds", "200", "--reps", "1"]) == 0
    assert os.sched_getaffinity(0) == allowed  # the pinning is undone: later tests see every CPU
    lines = capsys.readouterr().out.splitlines()
    same = [line for line in lines if line.startswith("same ")]
    assert len(same) == 1 and all(f"{way} " in same[0] for way in socket_floor.WAYS)

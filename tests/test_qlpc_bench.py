"""The Quick-LPC rows of the benchmark harness: they run end to end, are reported
skipped (never faked) without the C extension, and issue 6's targets apply to
the pinning each names. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from alpc import _native
from benchmarks import registry, targets

ROOT = Path(__file__).resolve().parent.parent


def record(impl: str, median: float, pinning: str) -> dict[str, Any]:
    return {"case": "roundtrip", "size": 64, "pinning": pinning, "implementation": impl, "status": "ok",
            "median": median, "lower_is_better": True}


def test_issue_6_targets_apply_to_their_pinning_only() -> None:
    records = [record(impl, median, pinning)
               for pinning, medians in (("same", (7.5, 15.0, 5.0)), ("split", (1.6, 45.0, 30.0)))
               for impl, median in zip(("alpc-quick", "socketpair", "c-futex"), medians, strict=True)]
    rows = {(row[1], row[4]): (row[5], row[6]) for row in targets.target_rows(records) if row[0] == "issue 6"}
    assert rows == {("alpc-quick >= 20x socketpair", "split"): ("28.12x", "yes"),
                    ("alpc-quick time <= 2x c-futex", "same"): ("1.50x", "yes")}
    records[0]["median"] = 12.0
    rows = {(row[1], row[4]): row[6] for row in targets.target_rows(records) if row[0] == "issue 6"}
    assert rows[("alpc-quick time <= 2x c-futex", "same")] == "**no**"


def test_quick_rows_say_why_they_cannot_run() -> None:
    for name in ("alpc-quick", "alpc-quick-msg"):
        reason = registry.missing_requirement(registry.IMPLEMENTATIONS[name])
        assert reason == _native.QUICK_UNAVAILABLE


@pytest.mark.skipif(_native.QUICK_UNAVAILABLE is not None, reason=str(_native.QUICK_UNAVAILABLE))
def test_quick_rows_run_end_to_end(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--case", "roundtrip", "--impl", "alpc-quick",
            "--impl", "alpc-quick-msg", "--impl", "socketpair", "--impl", "c-futex", "--reps", "1",
            "--out", str(tmp_path), "--no-plot", "--no-progress"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((tmp_path / "latest.json").read_text())["records"]
    assert {r["implementation"] for r in records} == {"alpc-quick", "alpc-quick-msg", "socketpair", "c-futex"}
    for row in records:
        assert row["status"] == "ok", row["reason"]
        assert row["median"] > 0
    assert "| issue 6 | alpc-quick time <= 2x c-futex | roundtrip | 64 B | same |" in done.stdout

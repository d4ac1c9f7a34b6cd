"""The targets table says when a target the run tried could not be evaluated.

A target whose alpc figure failed (a repetition errored) or whose reference was
skipped (grpcio not installed) used to vanish from the table, so the table showed
only the targets that were met or missed and a reader could not tell an
unevaluated target from one the run never tried. No timing is involved.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import report, targets

pytestmark = pytest.mark.timeout(30)


def record(impl: str, kind: str, median: float | None, status: str = "ok",
           reason: str | None = None) -> dict[str, Any]:
    return {"case": "roundtrip", "size": 64, "connections": 1, "pinning": "same",
            "cpus": {"client": 0, "server": 0}, "implementation": impl, "kind": kind, "status": status,
            "reason": reason, "median": median, "p99": median, "min": median, "max": median, "unit": "us",
            "lower_is_better": True, "repetitions": 1}


def rows_by_target(records: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {row[1]: (row[5], row[6]) for row in targets.target_rows(records) if row[4] == "same"}


def test_a_target_whose_alpc_figure_failed_is_reported_not_measured() -> None:
    records = [record("alpc", "alpc", 40.0, "error", "1 of 5 repetitions failed: TimeoutError"),
               record("socketpair", "peer", 15.0), record("mp.Pipe", "peer", 20.0)]
    rows = rows_by_target(records)
    measured, met = rows["alpc time <= 1.1x socketpair"]
    assert measured == "-"
    assert met.startswith("**not measured**") and "alpc error" in met and "TimeoutError" in met
    assert "alpc time <= 1x mp.Pipe" in rows


def test_a_target_whose_reference_was_skipped_is_reported_not_measured() -> None:
    records = [record("alpc", "alpc", 40.0), record("alpc-rpc", "alpc", 48.0),
               record("grpc", "peer", None, "skipped", "grpc is not installed")]
    rows = rows_by_target(records)
    assert rows["alpc-rpc time <= 1.3x alpc"] == ("1.20x", "yes")
    measured, met = rows["alpc-rpc >= 5x grpc"]
    assert measured == "-" and "grpc skipped" in met and "grpc is not installed" in met
    table = report.targets_table(records)
    assert table is not None and "alpc-rpc >= 5x grpc" in table


def test_targets_the_run_never_tried_still_have_no_row() -> None:
    # Only alpc-quick's rows ran: nothing for the other roundtrip targets.
    records = [record("alpc-quick", "alpc", 7.5), record("c-futex", "ceiling", 5.0)]
    assert set(rows_by_target(records)) == {"alpc-quick time <= 2x c-futex"}
    # A run of alpc alone that failed tried none of alpc's peer targets.
    assert rows_by_target([record("alpc", "alpc", None, "error", "1 of 1 repetitions failed")]) == {}

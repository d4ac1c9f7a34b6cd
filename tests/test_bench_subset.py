"""A subset run (some cases, implementations or pinnings) is never taken for the published full run.

benchmarks/README.md shows ``python -m benchmarks --case roundtrip --impl alpc ...
# any subset``: that run wrote its few records over benchmarks/results/latest.json,
its markdown said "full run", and ``make bench-readme`` then published it in the
README as the full run. No process is started: the runs here plan no repetition.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import harness, report

pytestmark = pytest.mark.timeout(60)


def test_a_subset_run_does_not_write_over_the_published_results() -> None:
    for argv in (["--case", "roundtrip", "--impl", "alpc"], ["--pinning", "same"], ["--reps", "1"]):
        options = harness.parse_args(argv)
        assert options.out_dir != report.RESULTS_DIR, argv
    # A one-question script is a subset too.
    assert harness.parse_args([], cases=["throughput"]).out_dir != report.RESULTS_DIR
    # The full run still publishes; a quick run still goes to results/quick.
    assert harness.parse_args([]).out_dir == report.RESULTS_DIR
    assert harness.parse_args(["--quick"]).out_dir == report.RESULTS_DIR / "quick"


def test_a_subset_run_says_so_and_cannot_be_published(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # grpc has no oneway row: the run plans nothing and starts no process.
    options = harness.parse_args(["--case", "oneway", "--impl", "grpc", "--out", str(tmp_path), "--no-plot"])
    meta, records = harness.run(options)
    json_path, md_path = report.write_results(tmp_path, meta, records)
    markdown = md_path.read_text()
    assert "full run" not in markdown
    assert "subset" in markdown and "oneway" in markdown
    assert json.loads(json_path.read_text())["subset"]["cases"] == ["oneway"]
    readme = report.REPO_ROOT / "README.md"
    before = readme.read_text()
    with pytest.raises(SystemExit):
        report.main(["--results", str(json_path), "--update-readme"])
    assert readme.read_text() == before
    with pytest.raises(SystemExit):
        harness.parse_args(["--case", "roundtrip", "--update-readme"])
    capsys.readouterr()

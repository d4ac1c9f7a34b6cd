"""A broker that cannot start is a failed measurement, not an optional peer that is absent.

It used to mark every alpc row "skipped", like a missing pyzmq, so ``make bench``
exited 0 with no alpc figure at all. No process is started: the broker's start
is made to fail, which leaves nothing to run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import harness

pytestmark = pytest.mark.timeout(60)


def test_a_broker_that_does_not_start_fails_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(self: harness.Broker, timeout: float = 30.0) -> None:
        raise RuntimeError("the alpc broker did not start: no runtime dir")

    monkeypatch.setattr(harness.Broker, "start", refuse)
    status = harness.main(["--case", "roundtrip", "--impl", "alpc", "--pinning", "same", "--out", str(tmp_path),
                           "--no-plot", "--no-progress"])
    captured = capsys.readouterr()
    assert status == 1, captured.out
    records = json.loads((tmp_path / "latest.json").read_text())["records"]
    assert [r["status"] for r in records] == ["error"]
    assert "did not start" in records[0]["reason"]
    assert "alpc (error)" in captured.out

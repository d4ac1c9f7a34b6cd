"""The short soak: ~20 s of many clients, several servers and a chaos thread (``make soak`` runs minutes)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import run_soak


@pytest.mark.timeout(180)
def test_short_soak_with_chaos(runtime_dir: Path) -> None:
    report = run_soak(duration=20, servers=3, clients=6, chaos_interval=0.7, runtime_dir=runtime_dir)
    figures = json.dumps(asdict(report), indent=2)
    assert report.ok, figures
    # The chaos really struck every kind, and traffic really flowed through the restarts.
    assert all(count > 0 for count in report.kills.values()), figures
    assert report.connects > 100 and report.requests > 1000, figures
    assert report.reregistrations > 0, figures
    print(figures)

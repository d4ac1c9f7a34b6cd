"""`alpc ports/peers/stats --watch` keeps waiting through a broker restart (no socket for a
while), but a runtime dir no broker can ever listen in (a regular file) is an error at once:
the watch printed "broker unavailable: ... Not a directory" for ever, as if a restart ran."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


def run(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The unfixed watch never ends: the subprocess timeout turns that into a failure.
    return subprocess.run([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), *args],
                          capture_output=True, text=True, timeout=10, cwd=ROOT)


@pytest.mark.parametrize("view", [["ports"], ["stats"], ["peers", "svc.nowhere"]])
@pytest.mark.parametrize("under", [False, True])
def test_watch_fails_at_once_for_a_runtime_dir_that_is_a_file(tmp_path: Path, view: list[str],
                                                               under: bool) -> None:
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("")
    runtime_dir = not_a_dir / "alpc" if under else not_a_dir
    result = run(runtime_dir, *view, "--watch", "--interval", "0.01")
    assert result.returncode == 1, result.stdout[-500:]
    assert result.stderr.startswith("alpc: BrokerUnavailable: ")
    assert "Not a directory" in result.stderr


@pytest.mark.parametrize("missing", ["dir", "socket"])
def test_watch_still_waits_for_a_missing_broker(tmp_path: Path, missing: str) -> None:
    runtime_dir = tmp_path / "rt"
    if missing == "socket":
        runtime_dir.mkdir(mode=0o700)
    result = run(runtime_dir, "ports", "--watch", "--interval", "0.01", "--count", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("broker unavailable") == 3

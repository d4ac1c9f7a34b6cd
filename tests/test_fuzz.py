"""A short run of every coverage-guided fuzz target (tests/fuzz/), in this process's implementation.

`make fuzz` runs them for minutes; here each gets a few thousand inputs, so a
regression in a parser shows up in `make test` too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz" / "fuzz_targets.py"
RUNS = 5000


@pytest.mark.parametrize("target", ["wire", "broker", "handshake"])
def test_fuzz_target_runs_clean(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    artifacts, scratch = tmp_path / "artifacts", tmp_path / "tmp"
    artifacts.mkdir()
    scratch.mkdir()
    done = subprocess.run([sys.executable, str(FUZZ), target, "--runs", str(RUNS), "--artifacts", str(artifacts)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "TMPDIR": str(scratch)})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    # At least RUNS: libFuzzer may finish the mutation batch under way (a CI run said "Done 5004 runs").
    done_runs = re.search(r"^Done (\d+) runs", output, re.M)
    assert done_runs is not None and int(done_runs.group(1)) >= RUNS, output[-2000:]
    assert not list(artifacts.iterdir()), "a failing input was written"
    assert not list(scratch.iterdir()), "the fuzzer left its corpus behind"

"""Run every fuzz target, with the C extension and with its pure-Python twin, and sum up.

    python tests/fuzz/campaign.py [--seconds S | --runs N] [--artifacts DIR]

Prints one line per target and implementation, then a total; exits 1 if any
target found a failing input (kept in ``--artifacts``, default ``fuzz-artifacts/``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("wire", "broker", "handshake")
MODES = {"c": {"ALPC_REQUIRE_NATIVE": "1"}, "python": {"ALPC_PUREPYTHON": "1"}}
_DONE = re.compile(r"^Done (\d+) runs", re.M)


def run(target: str, mode: str, budget: list[str], artifacts: Path) -> tuple[int, bool, str]:
    """(inputs run, whether it failed, libFuzzer's tail) of one target in one implementation."""
    env = {**os.environ, **MODES[mode]}
    env.pop("ALPC_PUREPYTHON" if mode == "c" else "ALPC_REQUIRE_NATIVE", None)
    done = subprocess.run([sys.executable, str(HERE / "fuzz_targets.py"), target, *budget,
                           "--artifacts", str(artifacts)], capture_output=True, text=True, env=env, check=False)
    output = done.stdout + done.stderr
    found = _DONE.search(output)
    executed = re.search(r"stat::number_of_executed_units:\s+(\d+)", output)
    runs = int(found.group(1)) if found else int(executed.group(1)) if executed else 0
    return runs, done.returncode != 0, "\n".join(output.splitlines()[-25:])


def main() -> int:
    parser = argparse.ArgumentParser()
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=int, default=None, help="per target and implementation")
    budget.add_argument("--runs", type=int, default=None, help="per target and implementation")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
    parser.add_argument("--target", action="append", choices=TARGETS)
    args = parser.parse_args()
    args.artifacts.mkdir(parents=True, exist_ok=True)
    limit = ["--runs", str(args.runs)] if args.runs else ["--seconds", str(args.seconds or 60)]
    total = failures = 0
    for target in args.target or TARGETS:
        for mode in MODES:
            runs, failed, tail = run(target, mode, limit, args.artifacts)
            total += runs
            failures += failed
            print(f"{target:10} {mode:7} {runs:>10} inputs  {'FAILED' if failed else 'ok'}", flush=True)
            if failed:
                print(tail, file=sys.stderr)
    print(f"total      {total:>18} inputs, {failures} failing targets")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

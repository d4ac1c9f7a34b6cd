"""The `alpc` command given bad arguments: one line on stderr and exit 1 (README), nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import alpc

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


def run(runtime_dir: Path | str, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    # A short timeout: an argument the command should refuse must not start a broker that serves on.
    return subprocess.run([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), *args],
                          capture_output=True, text=True, timeout=20, cwd=ROOT, pass_fds=pass_fds)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("value", ["-1", "nan"])
@pytest.mark.parametrize("command", [["ports"], ["peers", "svc.x"], ["stats"], ["ping", "svc.x"]])
def test_a_negative_or_nan_timeout_is_a_bad_argument(runtime_dir: Path, command: list[str], value: str) -> None:
    # -1 was a ValueError traceback from deep in the connect; nan an immediate Timeout.
    assert_one_line_error(run(runtime_dir, *command, "--timeout", value), "--timeout")


def test_an_infinite_timeout_is_accepted(broker: alpc.Broker, runtime_dir: Path) -> None:
    # Was an OverflowError traceback while connecting to the broker.
    done = run(runtime_dir, "ports", "--timeout", "inf")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no ports"


@pytest.mark.parametrize("value", ["inf", "1e400", "1e300"])
def test_an_interval_time_sleep_cannot_take_is_a_bad_argument(broker: alpc.Broker, runtime_dir: Path,
                                                            value: str) -> None:
    # Was an OverflowError traceback after the first refresh.
    assert_one_line_error(run(runtime_dir, "ports", "--watch", "--count", "2", "--interval", value), "--interval")


@pytest.mark.parametrize("option", ["--max-connections-per-uid", "--max-ports-per-uid"])
def test_a_broker_quota_past_64_bits_is_a_bad_argument(runtime_dir: Path, option: str) -> None:
    # Was taken: the broker then served, and failed every `alpc stats` with an internal error.
    assert_one_line_error(run(runtime_dir, "broker", option, str(2**70)), option)


def test_a_runtime_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    # Was a FileNotFoundError / NotADirectoryError traceback from mkdir.
    assert_one_line_error(run(blocker / "alpc", "broker"), "alpc:")


def test_a_bad_ready_fd_leaves_no_socket_behind(runtime_dir: Path) -> None:
    r, w = os.pipe()
    os.close(w)
    os.close(r)  # a number that is no open fd in the child either
    done = run(runtime_dir, "broker", "--ready-fd", str(w))
    # Was a traceback, and broker.sock (and broker.lock) stayed in the runtime dir.
    # The broker logs its start and stop at INFO first; the error is still one line, no traceback.
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "alpc: OSError: [Errno 9] Bad file descriptor", done.stderr
    assert sorted(os.listdir(runtime_dir)) == []

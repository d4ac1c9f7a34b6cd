"""The autouse leak check itself: a test that leaves an alpc socket file behind fails."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
LOCAL_PAIRS = CONFTEST.with_name("local_pairs.py")  # the conftest imports it

LEAKY_TESTS = '''
import os
import socket
from pathlib import Path


def _bind(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # the file stays: nobody unlinked it


def test_socket_left_in_runtime_dir(runtime_dir):
    _bind(runtime_dir / "anything.sock")


def test_broker_socket_left_in_tmp_path(tmp_path):
    (tmp_path / "rt").mkdir()
    _bind(tmp_path / "rt" / "broker.sock")


def test_socket_left_in_the_default_runtime_dir():
    _bind(Path(os.environ["ALPC_RUNTIME_DIR"]) / "broker.sock")


def test_own_socket_in_tmp_path_is_the_tests_business(tmp_path):
    _bind(tmp_path / "notify")


def test_a_clean_runtime_dir(runtime_dir):
    path = runtime_dir / "broker.sock"
    _bind(path)
    path.unlink()
'''


@pytest.mark.timeout(120)
def test_socket_files_left_behind_fail_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(local_pairs=LOCAL_PAIRS.read_text())
    pytester.makepyfile(test_leaky=LEAKY_TESTS)
    # A short basetemp: pytester's own nests too deep for a Unix socket path (108 bytes).
    basetemp = Path(tempfile.mkdtemp(prefix="leak-"))
    try:
        # A subprocess: the conftest sets this process's environment (ALPC_RUNTIME_DIR) at import.
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--basetemp={basetemp / 'b'}")
    finally:
        shutil.rmtree(basetemp)
    result.assert_outcomes(passed=5, errors=3)
    errors = sorted(line.split("::")[1].split()[0] for line in result.outlines if line.startswith("ERROR "))
    assert errors == ["test_broker_socket_left_in_tmp_path", "test_socket_left_in_runtime_dir",
                      "test_socket_left_in_the_default_runtime_dir"]
    for leaked in ("anything.sock", "rt/broker.sock", "alpc-tests-"):
        assert any("socket files left behind" in line and leaked in line for line in result.outlines), leaked

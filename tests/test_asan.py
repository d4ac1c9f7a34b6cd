"""The C bounds checks under AddressSanitizer and UBSan: a short run of `make asan`'s drivers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["-std=c11", "-g", "-O1", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def test_c_parsers_are_clean_under_asan(tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler")
    driver = tmp_path / "native_driver"
    subprocess.run([compiler, *FLAGS, f"-I{ROOT / 'csrc'}", '-DALPC_SOURCE_HASH="asan"',
                    str(ROOT / "csrc" / "alpc_native.c"), str(ROOT / "tests" / "asan" / "native_driver.c"),
                    "-o", str(driver)], check=True, timeout=120)
    done = subprocess.run([str(driver), "20000", "7"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().endswith(" 0 failures"), done.stdout


def test_quick_lpc_rings_are_clean_under_asan_against_a_hostile_peer(tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler")
    driver = tmp_path / "qlpc_driver"
    subprocess.run([compiler, *FLAGS, f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "qlpc.c"),
                    str(ROOT / "tests" / "asan" / "qlpc_driver.c"), "-o", str(driver), "-lpthread"],
                   check=True, timeout=120)
    # Long enough that the driver also insists every ring check was reached.
    done = subprocess.run([str(driver), "150000", "7"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().endswith(" 0 failures"), done.stdout

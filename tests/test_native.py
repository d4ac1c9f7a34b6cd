"""The C extension and its pure-Python twin: selection, stale-build detection, agreement."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from alpc import _native

ROOT = Path(__file__).resolve().parent.parent


def _isolated(tree: Path, code: str, **env_changes: str | None) -> subprocess.CompletedProcess[str]:
    """Import alpc from ``tree`` only: -S skips the .pth of the editable install."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *site.getsitepackages()])}
    env.pop("ALPC_PUREPYTHON", None)
    env.pop("ALPC_REQUIRE_NATIVE", None)
    for key, value in env_changes.items():
        if value is not None:
            env[key] = value
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=60)


def test_selected_implementation_matches_the_environment() -> None:
    if os.environ.get("ALPC_PUREPYTHON") == "1":
        assert _native.IMPLEMENTATION == "python"
    elif os.environ.get("ALPC_REQUIRE_NATIVE") == "1":
        assert _native.IMPLEMENTATION == "c"


def test_error_codes_agree_with_the_c_header() -> None:
    header = (ROOT / "csrc" / "alpc_native.h").read_text()
    for name in ("MAGIC", "VERSION", "TYPE", "FLAGS", "RESERVED", "DATA", "ATTR", "FDS"):
        value = getattr(_native, f"E_{name}")
        assert f"ALPC_E_{name} = {value}," in header


def test_source_hash_changes_with_the_sources(tmp_path: Path) -> None:
    copy = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", copy)
    before = _native.source_hash(copy)
    with (copy / "alpc_native.c").open("a") as f:
        f.write("\n/* edited */\n")
    assert before is not None and _native.source_hash(copy) != before
    assert _native.source_hash(tmp_path / "missing") is None


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="needs the built extension")
def test_stale_build_is_detected_at_import(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "alpc", tree / "alpc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    with (tree / "csrc" / "alpc_native.c").open("a") as f:
        f.write("\n/* edited after the build */\n")
    result = _isolated(tree, "import alpc")
    assert result.returncode != 0
    assert "NativeBuildError" in result.stderr and "stale" in result.stderr


def test_missing_extension_is_an_error_when_required(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "alpc", tree / "alpc",
                    ignore=shutil.ignore_patterns("__pycache__", "_alpc_native*"))
    result = _isolated(tree, "import alpc", ALPC_REQUIRE_NATIVE="1")
    assert result.returncode != 0 and "not built" in result.stderr
    result = _isolated(tree, "import alpc._native as n; print(n.IMPLEMENTATION)")
    assert result.stdout.strip() == "python", result.stderr


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="needs the built extension")
def test_c_scanner_rejects_bad_arguments() -> None:
    ffi, lib = _native._ext  # type: ignore[misc]
    count = ffi.new("size_t *")
    ends = ffi.new("size_t[4]")
    limits = ffi.new("alpc_limits *")
    buf = ffi.from_buffer(b"x" * 8)
    assert lib.alpc_scan_frames(buf, 8, 9, limits, ends, 4, count) == lib.ALPC_E_ARGS
    assert lib.alpc_scan_frames(ffi.NULL, 0, 0, limits, ends, 4, count) == lib.ALPC_E_ARGS
    assert lib.alpc_scan_frames(buf, 8, 0, limits, ends, 4, ffi.NULL) == lib.ALPC_E_ARGS

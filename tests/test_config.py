"""Runtime-dir resolution and its safety checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alpc.config import Config, PortAttributes, default_runtime_dir, ensure_runtime_dir
from alpc.errors import AccessDenied


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALPC_RUNTIME_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert default_runtime_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ALPC_RUNTIME_DIR")
    assert default_runtime_dir() == tmp_path / "xdg" / "alpc"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_runtime_dir() == Path(f"/tmp/alpc-{os.getuid()}")


def test_explicit_dir_wins(tmp_path: Path) -> None:
    assert Config.from_env(tmp_path).broker_socket == tmp_path / "broker.sock"


def test_runtime_dir_given_as_str(tmp_path: Path) -> None:
    config = Config(runtime_dir=str(tmp_path))  # type: ignore[arg-type]
    assert config.runtime_dir == tmp_path
    assert config.broker_socket == tmp_path / "broker.sock"


def test_created_private(tmp_path: Path) -> None:
    path = ensure_runtime_dir(tmp_path / "new" / "alpc")
    assert path.stat().st_mode & 0o777 == 0o700


def test_open_dir_refused(tmp_path: Path) -> None:
    path = tmp_path / "open"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    with pytest.raises(AccessDenied, match="accessible to others"):
        ensure_runtime_dir(path)


def test_file_instead_of_dir_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(AccessDenied, match="not a directory"):
        ensure_runtime_dir(path)


@pytest.mark.parametrize("field", ["max_message_length", "max_connect_data", "max_pending_connects"])
def test_port_attributes_validated(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PortAttributes(**{field: 0})
    with pytest.raises(ValueError, match="32 bits"):
        PortAttributes(max_message_length=1 << 33)

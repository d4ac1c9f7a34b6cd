"""A broker another user planted where ours is expected (the tests run as root; the
impostor drops to uid 65534).

The default runtime dir, /tmp/alpc-$UID, sits in a directory every user may create
entries in: anyone can make it first and run a broker there, which the real broker
then refuses to use (it is not ours). Clients and servers must not talk to that
broker either: a runtime dir in such a place is trusted only if it is ours or root's.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import alpc

SEC_PEERS = Path(__file__).resolve().parent / "security_peers.py"
NOBODY = 65534

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the impostor as another uid"),
]


@pytest.fixture
def world_writable() -> Iterator[Path]:
    """A directory like /tmp: sticky, every user may create entries in it."""
    path = Path(tempfile.mkdtemp(prefix="sec-tmp-", dir="/tmp"))
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_runtime_dir_another_user_planted_in_tmp_is_refused(world_writable: Path, spawn) -> None:  # type: ignore[no-untyped-def]
    planted = world_writable / f"alpc-{os.getuid()}"
    impostor = spawn.argv([sys.executable, str(SEC_PEERS), "impostor", str(planted), str(NOBODY), ""])
    impostor.expect("READY")
    assert planted.lstat().st_uid == NOBODY
    config = alpc.Config.from_env(planted)
    with pytest.raises(alpc.AccessDenied, match="uid 65534"):
        alpc.connect("svc.trusted", b"secret", config=config, timeout=5).close()
    with pytest.raises(alpc.AccessDenied, match="uid 65534"):
        alpc.create_port("svc.mine", config=config, timeout=5, reregister_timeout=0).close()
    # The impostor heard nothing of ours: its next line is the one it says when it stops.
    impostor.proc.stdin.close()
    assert impostor.expect("") == ["BYE"]


def test_our_own_runtime_dir_in_tmp_is_used(world_writable: Path, spawn) -> None:  # type: ignore[no-untyped-def]
    ours = world_writable / f"alpc-{os.getuid()}"
    with alpc.Broker(ours):
        config = alpc.Config.from_env(ours)
        with alpc.create_port("svc.ours", config=config, timeout=5) as port:
            assert port.registered

"""Fixtures of the hostile-peer suite: role processes, a shared broker, and leak probes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import alpc
from alpc.quotas import BrokerLimits

HOSTILE_PEERS = Path(__file__).resolve().parent / "hostile_peers.py"
NOBODY = 65534


@pytest.fixture
def role(spawn, runtime_dir: Path) -> Callable[..., object]:  # type: ignore[no-untyped-def]
    """role(ROLE, NAME, *options) starts tests/hostile/hostile_peers.py; killed at teardown."""
    def start(kind: str, name: str, *options: str):  # type: ignore[no-untyped-def]
        return spawn.argv([sys.executable, str(HOSTILE_PEERS), kind, name, "--runtime-dir", str(runtime_dir),
                           *options])
    return start


@pytest.fixture
def shared_broker(runtime_dir: Path) -> Iterator[alpc.Broker]:
    """A broker every local user can reach (0755 dir, 0666 socket); port ACLs keep them out."""
    with alpc.Broker(runtime_dir, shared=True) as running:
        yield running


@pytest.fixture
def small_broker(runtime_dir: Path) -> Iterator[alpc.Broker]:
    """A shared broker with tight per-uid quotas, for the flood tests."""
    limits = BrokerLimits(max_connections_per_uid=8, max_ports_per_uid=2)
    with alpc.Broker(runtime_dir, shared=True, limits=limits) as running:
        yield running

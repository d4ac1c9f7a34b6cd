"""Forked children of a process holding alpc objects: multiprocessing pool workers, and a
forked child stopping an rpc.Server while a parent thread held one of its locks."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
from test_fork_close import in_child_while_held  # tests/ is on sys.path, as for tests/test_rpc_e2e.py

import alpc
from alpc import rpc

pytestmark = pytest.mark.timeout(60)

LARGE = "x" * (256 << 10)  # past the inline threshold: through the connection's section
_client: rpc.Client[Any] | None = None


def _small(key: str) -> Any:
    assert _client is not None
    _client.proxy.put(key, os.getpid())
    return _client.proxy.get(key)


def _large(key: str) -> str:
    assert _client is not None
    try:
        _client.proxy.put(key, LARGE)
    except alpc.SectionError as exc:
        return f"refused: {exc}"
    return "sent"


def test_a_pool_worker_using_an_inherited_rpc_client_leaves_the_parents(
        broker: alpc.Broker, config: alpc.Config, spawn: Any, runtime_dir: Path) -> None:
    global _client
    from test_rpc_e2e import connect, start_server
    start_server(spawn, runtime_dir)
    with connect(config) as client:
        _client = client
        try:
            client.proxy.put("parent", "small")  # no section yet: the worker's would be number 1 too
            with multiprocessing.get_context("fork").Pool(1) as pool:
                worker_pid = pool.apply(_small, ("w",))  # the worker's small calls are its own
                assert worker_pid != os.getpid()
                answer = pool.apply(_large, ("w-large",))
            # The parent's connection must have come through whatever the worker did.
            client.proxy.put("parent2", LARGE)
            assert client.proxy.get("parent2") == LARGE
            assert client.proxy.get("parent") == "small"
            # A large call from the worker would take ranges (and section numbers) the parent
            # takes too: the server dropped the connection ("section 1 announced twice").
            assert answer.startswith("refused:") and "forked child" in answer, answer
        finally:
            _client = None


@pytest.mark.parametrize("lock", ["turns", "endpoints"])
def test_a_child_stopping_an_rpc_server_whose_lock_a_parent_thread_held_does_not_hang(
        broker: alpc.Broker, config: alpc.Config, lock: str) -> None:
    from rpc_peers import StoreImpl
    from test_rpc_e2e import NAME
    from test_rpc_e2e import connect as rpc_connect

    with rpc.Server(NAME, StoreImpl(), config=config, workers=2) as server, rpc_connect(config) as client:
        target = server._turns._lock if lock == "turns" else server._endpoints_lock  # a worker mid-event
        assert in_child_while_held(target, server.stop) == 0
        assert client.proxy.pid() == os.getpid()

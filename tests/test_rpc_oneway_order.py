"""One client's one-way calls run one at a time, in the order sent: on a blocking rpc.Server with
several workers (where they hold one worker between them) and on rpc.aio.Server with coroutine
handlers (a real server process, clients here)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from rpc_order_peers import Order

import alpc
from alpc import rpc

PEERS = str(Path(__file__).resolve().parent / "rpc_order_peers.py")
NAME = "svc.rpc.order"


def start_server(spawn: Any, runtime_dir: Path, workers: int, *options: str) -> Any:
    peer = spawn.argv([sys.executable, PEERS, NAME, "--runtime-dir", str(runtime_dir), "--workers", str(workers),
                       *options])
    peer.expect("READY")
    return peer


def connect(config: alpc.Config) -> rpc.Client[Any]:
    return rpc.connect(Order, NAME, config=config, timeout=10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", ["threads", "asyncio"])
def test_a_later_one_way_call_neither_overtakes_nor_overlaps_an_earlier_one(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, server: str) -> None:
    start_server(spawn, runtime_dir, 4, *(["--asyncio"] if server == "asyncio" else []))
    with connect(config) as client:
        client.proxy.step(0)  # waits up to 1 s for step(1) to start: it must not
        client.proxy.step(1)
        assert client.proxy.log(2, 10.0) == ["start 0", "end 0", "start 1", "end 1"]


@pytest.mark.timeout(60)
def test_one_clients_blocked_one_way_calls_hold_one_worker_not_the_server(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config) -> None:
    start_server(spawn, runtime_dir, workers=2)
    with connect(config) as slow, connect(config) as other:
        slow.proxy.hold("a")  # blocks its worker until release()
        slow.proxy.hold("b")  # waits for "a" to end, without taking the other worker
        # Sent after both: its answer means the server has received them (a connection is read
        # in order), and that the second worker is still free to serve this client.
        assert slow.with_timeout(5.0).log(0, 0.0) == ["hold a"]
        other.with_timeout(5.0).release()
        assert other.proxy.log(2, 10.0) == ["hold a", "released a", "hold b", "released b"]

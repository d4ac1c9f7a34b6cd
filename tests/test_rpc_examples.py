"""The RPC examples run as real programs: the embedded key-value service with its CLI, and the worker pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import alpc
from alpc import rpc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def env_for(runtime_dir: Path) -> dict[str, str]:
    return {**os.environ, "ALPC_RUNTIME_DIR": str(runtime_dir)}


def cli(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / "kv_cli.py"), *args], env=env_for(runtime_dir),
                          capture_output=True, text=True, timeout=30, cwd=EXAMPLES)


@pytest.mark.parametrize("program", ["kv_service.py", "kv_async_service.py"])
def test_kv_service_and_cli(broker: alpc.Broker, spawn: Any, runtime_dir: Path, program: str) -> None:
    # The blocking and the asyncio service answer the same CLI the same way.
    service = spawn.argv([sys.executable, str(EXAMPLES / program)], env=env_for(runtime_dir))
    service.expect("READY")
    assert cli(runtime_dir, "set", "greeting", "hello").returncode == 0
    assert cli(runtime_dir, "set", "name", "alpc").returncode == 0
    got = cli(runtime_dir, "get", "greeting")
    assert (got.returncode, got.stdout) == (0, "hello\n")
    missing = cli(runtime_dir, "get", "absent")
    assert missing.returncode == 1 and "not found" in missing.stderr
    assert cli(runtime_dir, "keys").stdout.split() == ["greeting", "name"]
    dumped = cli(runtime_dir, "dump")
    assert dumped.stdout.splitlines() == ["greeting=hello", "name=alpc", "(2 keys)"]
    stats = json.loads(cli(runtime_dir, "stats").stdout)
    assert stats["set"] == 2 and stats["keys"] == 2 and stats["asked_by_pid"] > 0

    # The service's own loop expires keys while it serves.
    assert cli(runtime_dir, "set", "brief", "x", "--ttl", "0.2").returncode == 0
    assert service.expect("expired") == ["1", "key(s)"]
    assert cli(runtime_dir, "get", "brief").returncode == 1

    assert cli(runtime_dir, "del", "name").returncode == 0
    assert cli(runtime_dir, "clear").stdout == "cleared 1 keys\n"
    service.proc.send_signal(signal.SIGTERM)
    assert service.expect("stopped:")
    assert service.proc.wait(10) == 0


def test_kv_cli_without_a_service(broker: alpc.Broker, runtime_dir: Path) -> None:
    result = cli(runtime_dir, "get", "x")
    assert result.returncode == 2 and "PortNotFound" in result.stderr


def test_kv_service_keeps_serving_while_dumps_call_back(broker: alpc.Broker, spawn: Any,
                                                        runtime_dir: Path) -> None:
    service = spawn.argv([sys.executable, str(EXAMPLES / "kv_service.py")], env=env_for(runtime_dir))
    service.expect("READY")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from kv_api import KeyValue
    finally:
        sys.path.remove(str(EXAMPLES))
    config = alpc.Config.from_env(runtime_dir)
    with rpc.connect(KeyValue, "examples.kv", config=config, timeout=10) as client:
        for index in range(20):
            client.proxy.set(f"k{index:02}", str(index).encode())
        results: list[subprocess.CompletedProcess[str]] = []
        threads = [threading.Thread(target=lambda: results.append(cli(runtime_dir, "dump"))) for _ in range(3)]
        for thread in threads:
            thread.start()
        # While the dumps call back into their CLIs, this client is still served.
        seen: list[str] = []
        assert client.proxy.dump("k0", rpc.callback(lambda key, value: seen.append(key))) == 10
        for thread in threads:
            thread.join(60)
    assert [r.stdout.splitlines()[-1] for r in results] == ["(20 keys)"] * 3
    assert seen == [f"k{i:02}" for i in range(10)]


def test_worker_pool_moves_large_buffers(broker: alpc.Broker, runtime_dir: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "worker_pool.py"), "--workers", "3", "--tasks", "9", "--size-mib", "1",
         "--timeout", "50"],
        env=env_for(runtime_dir), capture_output=True, text=True, timeout=55, cwd=EXAMPLES,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("OK 9 tasks by"), result.stdout
    assert time.monotonic() - started < 55

"""The `alpc` command and the demo, run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import alpc

ROOT = Path(__file__).resolve().parent.parent


def run(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_ports_json_and_table(broker: alpc.Broker, config: alpc.Config, runtime_dir: Path, spawn) -> None:
    with alpc.create_port("svc.listed", config=config) as port:
        client = spawn("client", "svc.listed")
        comm = port.listen(timeout=10).accept()
        client.expect("READY")
        # The server reports its clients to the broker asynchronously; poll, bounded.
        for _ in range(200):
            listed = json.loads(run(runtime_dir, "ports", "--json").stdout)
            if listed and listed[0]["clients"]:
                break
        assert listed == [{
            "name": "svc.listed", "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
            "max_message_length": port.attributes.max_message_length,
            "clients": [{"pid": client.pid, "uid": os.getuid(), "gid": os.getgid()}],
            "details": True,
            "limits": {
                "max_message_length": 1 << 30, "max_connect_data": 64 << 10, "max_pending_connects": 128,
                "max_connections": 4096, "max_pending_requests": 1024, "max_queued_datagrams": 1024,
                "max_handles_per_message": 0, "max_inflight_handles": 64, "handle_kinds": [],
                "max_section_bytes": 2 << 30, "max_port_section_bytes": 8 << 30, "send_timeout_ms": 5000,
                "refuse_identity_change": False,
            },
            "acl": {"allow_uids": [], "allow_gids": [], "deny_uids": [], "deny_gids": [], "allow_root": False,
                    "allow_everyone": False},
            # The broker's per-uid quotas for the owner: its registration and this query are its connections.
            "owner_quota": {"max_connections_per_uid": 1024, "max_ports_per_uid": 256, "connections": 2,
                            "ports": 1},
        }]
        table = run(runtime_dir, "ports").stdout
        assert "svc.listed" in table and f"pid {client.pid}" in table
        comm.close()


def test_ports_empty(broker: alpc.Broker, runtime_dir: Path) -> None:
    assert run(runtime_dir, "ports").stdout.strip() == "no ports"
    assert json.loads(run(runtime_dir, "ports", "--json").stdout) == []


def test_ping_round_trips(broker: alpc.Broker, runtime_dir: Path, spawn) -> None:
    server = spawn("server", "svc.pingable")
    server.expect("READY")
    result = run(runtime_dir, "ping", "svc.pingable", "--count", "20")
    assert result.returncode == 0, result.stderr
    assert f"server pid {server.pid}" in result.stdout
    assert "20 round trips" in result.stdout and "median" in result.stdout


def test_errors_are_one_line_and_exit_1(broker: alpc.Broker, runtime_dir: Path, tmp_path: Path) -> None:
    result = run(runtime_dir, "ping", "svc.nobody")
    assert result.returncode == 1
    assert result.stderr.strip().endswith("PortNotFound: no port named 'svc.nobody'")
    nobroker = tmp_path / "empty"
    nobroker.mkdir(mode=0o700)
    result = run(nobroker, "ports")
    assert result.returncode == 1 and "BrokerUnavailable" in result.stderr


def test_demo_runs_end_to_end(runtime_dir: Path) -> None:
    env = {**os.environ, "ALPC_RUNTIME_DIR": str(runtime_dir)}
    result = subprocess.run([sys.executable, "examples/demo.py"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client: request b'ping' -> b'PING'" in result.stdout
    assert "round trips" in result.stdout and "demo: done" in result.stdout


def test_counts_must_be_positive_integers(broker: alpc.Broker, runtime_dir: Path, spawn) -> None:
    # A live server: a bad count must be refused before anything is timed, not crash after connecting.
    server = spawn("server", "svc.counted-pings")
    server.expect("READY")
    for argv in (["ping", "svc.counted-pings", "--count", "0"], ["ping", "svc.counted-pings", "--count", "-3"],
                 ["ping", "svc.counted-pings", "--count", "many"], ["stats", "--watch", "--count", "0"]):
        result = run(runtime_dir, *argv)
        assert result.returncode == 1, (argv, result.stderr)
        assert result.stdout == "" and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "argument --count: must be a positive integer" in result.stderr
    result = run(runtime_dir, "ping", "svc.counted-pings", "--count", "1")
    assert result.returncode == 0 and "1 round trips" in result.stdout

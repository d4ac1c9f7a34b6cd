"""`alpc ports/peers/stats --json --watch`: output a script can parse, one JSON document per refresh."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import alpc

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


def run(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def documents(stdout: str) -> list[object]:
    """Each line one JSON document (JSON Lines), as `--json` promises a script."""
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.mark.parametrize("view", [["ports"], ["stats"], ["peers", "svc.jsonwatch"]])
def test_json_watch_prints_one_json_document_per_refresh(broker: alpc.Broker, config: alpc.Config,
                                                         runtime_dir: Path, view: list[str]) -> None:
    with alpc.create_port("svc.jsonwatch", config=config):
        result = run(runtime_dir, *view, "--json", "--watch", "--interval", "0.05", "--count", "3")
    assert result.returncode == 0, result.stderr
    found = documents(result.stdout)
    assert len(found) == 3
    assert all("svc.jsonwatch" in json.dumps(doc) for doc in found)


def test_json_watch_reports_a_missing_broker_as_json(tmp_path: Path) -> None:
    empty = tmp_path / "nobroker"
    empty.mkdir(mode=0o700)
    result = run(empty, "ports", "--json", "--watch", "--interval", "0.05", "--count", "2")
    assert result.returncode == 0, result.stderr
    found = documents(result.stdout)
    assert len(found) == 2
    assert all(isinstance(doc, dict) and doc["error"] == "BrokerUnavailable" for doc in found)


OPS = Path(__file__).resolve().parent / "ops_peers.py"


def test_peers_watch_keeps_going_while_the_port_registers_again(spawn, runtime_dir: Path) -> None:
    # The README: --watch "keeps going while the broker restarts". After a restart the port is
    # back only once its server registered again; a watch that exits on PortNotFound meanwhile
    # does not keep going.
    def start_broker():  # type: ignore[no-untyped-def]
        broker = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker"])
        broker.expect("READY")
        return broker

    first = start_broker()
    server = spawn.argv([sys.executable, str(OPS), "server", "svc.watched", "--runtime-dir", str(runtime_dir)])
    server.expect("READY")
    watch = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir),
                        "peers", "svc.watched", "--watch", "--interval", "0.05"])
    second = None
    try:
        watch.expect("port svc.watched")
        server.proc.send_signal(signal.SIGSTOP)  # it registers again only when the test lets it
        first.proc.terminate()
        assert first.proc.wait(10) == 0
        watch.expect("broker unavailable")
        second = start_broker()
        watch.expect("port not found")  # the unfixed watch exits 1 here with PortNotFound
        server.proc.send_signal(signal.SIGCONT)
        watch.expect("port svc.watched")  # and shows the port again once it is back
    finally:
        server.proc.send_signal(signal.SIGCONT)
        watch.proc.terminate()
        watch.proc.wait(10)
        server.proc.terminate()
        server.proc.wait(10)
        if second is not None:
            second.proc.terminate()
            second.proc.wait(10)

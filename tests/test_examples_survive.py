"""The serving loops users copy (examples/echo_server.py, the README's "Serving many clients")
run as real programs against a client that gives up between its connect and the accept."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

import alpc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PEERS = Path(__file__).resolve().parent / "serving_peers.py"

pytestmark = pytest.mark.timeout(60)


def env_for(runtime_dir: Path) -> dict[str, str]:
    return {**os.environ, "ALPC_RUNTIME_DIR": str(runtime_dir)}


def readme_serving_loop() -> str:
    """The README's "Serving many clients" loop, made a program that says when it is ready."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Serving many clients", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    code = match.group(1)
    assert "port.wait()" in code
    code = code.replace("    while True:\n", "    print('READY', flush=True)\n    while True:\n", 1)
    return "import os, sys\nimport alpc\nhandle = bytes.upper\n" + code


def _half_closed_client(spawn: Any, name: str, runtime_dir: Path) -> Any:
    gone = spawn.argv([sys.executable, str(PEERS), "half-closed", name, "--runtime-dir", str(runtime_dir)])
    gone.expect("SENT")
    return gone


def test_echo_server_serves_on_after_a_client_gone_before_its_accept(broker: alpc.Broker, spawn: Any,
                                                                     runtime_dir: Path, config: alpc.Config) -> None:
    """Its accept fails with PeerGone (the client's socket no longer reads): the example must
    go on serving, not die with a traceback and take every other client with it."""
    server = spawn.argv([sys.executable, str(EXAMPLES / "echo_server.py"), "examples.echo"], env=env_for(runtime_dir))
    server.expect("READY")
    gone = _half_closed_client(spawn, "examples.echo", runtime_dir)
    assert server.expect("server: connect from pid")[0] == str(gone.pid)
    with alpc.connect("examples.echo", b"after", config=config, timeout=10) as comm:
        assert comm.request(b"still serving", timeout=10).data == b"STILL SERVING"
    assert server.proc.poll() is None


def test_readme_serving_loop_serves_on_after_a_client_gone_before_its_accept(  # type: ignore[no-untyped-def]
        broker: alpc.Broker, spawn, runtime_dir: Path, config: alpc.Config) -> None:
    server = spawn.argv([sys.executable, "-c", readme_serving_loop()], env=env_for(runtime_dir))
    server.expect("READY")
    _half_closed_client(spawn, "svc.kv", runtime_dir)
    with alpc.connect("svc.kv", config=config, timeout=10) as comm:
        assert comm.request(b"still serving", timeout=10).data == b"STILL SERVING"
    assert server.proc.poll() is None

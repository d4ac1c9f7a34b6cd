"""`make demo`: a real broker, a real server process and a real client exchange.

Starts a broker when none is listening in the runtime dir, and stops it again.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import alpc
from alpc.transport import is_live_socket

HERE = Path(__file__).resolve().parent


def start(label: str, argv: list[str]) -> tuple[subprocess.Popen[str], threading.Thread]:
    """Start a process and wait for its READY line, then echo its output as it comes."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise SystemExit(f"demo: the {label} did not start: {line!r}")
    print(f"demo: the {label} is {line.strip()}", flush=True)
    relay = threading.Thread(target=lambda: [print(text, end="", flush=True) for text in proc.stdout or ()])
    relay.start()
    return proc, relay


def stop(started: tuple[subprocess.Popen[str], threading.Thread]) -> None:
    proc, relay = started
    proc.terminate()
    proc.wait(10)
    relay.join(10)
    if proc.stdout is not None:
        proc.stdout.close()


def main() -> int:
    config = alpc.Config.from_env()
    broker = None
    if is_live_socket(config.broker_socket):
        print(f"demo: using the broker already running at {config.broker_socket}")
    else:
        broker = start("broker", [sys.executable, "-m", "alpc", "broker"])
    server = start("server", [sys.executable, str(HERE / "echo_server.py"), "demo.echo"])
    try:
        subprocess.run([sys.executable, str(HERE / "echo_client.py"), "demo.echo"], check=True, timeout=60)
        subprocess.run([sys.executable, "-m", "alpc", "ports"], check=True, timeout=30)
        subprocess.run([sys.executable, "-m", "alpc", "ping", "demo.echo", "--count", "100"],
                       check=True, timeout=30)
    finally:
        stop(server)
        if broker is not None:
            stop(broker)
    print("demo: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Connects to "demo.echo", shows both identities, and exchanges a few messages."""

from __future__ import annotations

import sys
import time

import alpc


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "demo.echo"
    with alpc.connect(name, data=b"hello", timeout=5) as comm:
        print(f"client: connected to pid {comm.server.pid} uid {comm.server.uid}, "
              f"accept data {comm.accept_data!r}")
        print(f"client: request b'ping' -> {comm.request(b'ping', timeout=5).data!r}")
        comm.send(b"fire and forget")
        rounds = 1000
        started = time.perf_counter()
        for _ in range(rounds):
            comm.request(b"x" * 64, timeout=5)
        elapsed = time.perf_counter() - started
        print(f"client: {rounds} round trips of 64 B, {elapsed / rounds * 1e6:.1f} us each")


if __name__ == "__main__":
    main()

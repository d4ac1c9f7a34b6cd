"""A client that sends datagrams as fast as the server's window lets it (for
tests/test_completion_ordered_window.py and test_rpc_oneway_window.py).

Run as ``python tests/window_flood_peers.py client NAME --runtime-dir DIR``. Prints ``READY`` once
connected, then obeys one stdin line at a time:

- ``flood COUNT SECONDS`` sends up to COUNT datagrams (``b"0"``, ``b"1"``, ...), each send
  waiting at most SECONDS for room in the server's window; ``FLOODED SENT`` says how many went
  (fewer than COUNT once a send was Throttled: the window stayed closed that long);
- ``quit`` closes the port (``BYE``).

``python tests/window_flood_peers.py rpc-client NAME --runtime-dir DIR`` is the same over RPC:
``flood COUNT SECONDS`` makes up to COUNT one-way calls ``Sink.put(0)``, ``Sink.put(1)``, ...,
each waiting at most SECONDS for room.
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc
from alpc import rpc


class Sink(rpc.Interface, name="test.q9.sink", version=(1, 0)):
    @rpc.method(oneway=True)
    def put(self, index: int) -> None: ...


def say(*parts: object) -> None:
    print(*parts, flush=True)


def flood(comm: alpc.CommunicationPort, count: int, seconds: float) -> int:
    for sent in range(count):
        try:
            comm.send(str(sent).encode(), timeout=seconds)
        except alpc.Throttled:
            return sent
    return count


def rpc_flood(sink: Sink, count: int) -> int:
    for sent in range(count):
        try:
            sink.put(sent)
        except alpc.Throttled:
            return sent
    return count


def rpc_client(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    with rpc.connect(Sink, args.name, config=config, timeout=10) as connection:
        say("READY", os.getpid())
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "flood":
                sink = rpc.with_timeout(connection.proxy, float(words[2]))
                say("FLOODED", rpc_flood(sink, int(words[1])))
            elif words[0] == "quit":
                break
    say("BYE")


def client(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.connect(args.name, config=config, timeout=10) as comm:
        say("READY", os.getpid())
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "flood":
                say("FLOODED", flood(comm, int(words[1]), float(words[2])))
            elif words[0] == "quit":
                break
    say("BYE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["client", "rpc-client"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    args = parser.parse_args()
    (client if args.role == "client" else rpc_client)(args)


if __name__ == "__main__":
    main()

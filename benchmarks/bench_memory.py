"""Question: how much memory does an idle connection cost?

The client opens N connections (each answers one 64-byte request, then sits
idle); the record is the growth of private memory (Private_Clean +
Private_Dirty in /proc/PID/smaps_rollup) of server plus client, divided by N,
measured after a few warm-up connections. Kernel socket buffers are not
process memory and are not counted. Run alone: ``python -m benchmarks.bench_memory``.
"""

from __future__ import annotations

import gc

from .bench_roundtrip import echo
from .core import Case, Point, Timing
from .runner import Outcome, Pair, make_payload, private_memory
from .transports.base import Client

__all__ = ["CASE"]

# Connections made before the baseline: lazily created per-process state
# (thread pools, contexts, caches) is not a per-connection cost.
WARM_CONNECTIONS = 4


def drive_memory(pair: Pair) -> Outcome:
    payload = make_payload(pair.point.size)
    clients: list[Client] = []

    def connect() -> None:
        client = pair.transport.client(len(clients))
        clients.append(client)
        if len(client.request(payload)) != len(payload):
            raise AssertionError("a reply had the wrong length")

    try:
        for _ in range(WARM_CONNECTIONS):
            connect()
        gc.collect()
        server_before, client_before = private_memory(pair.server_pid), private_memory()
        # Each connect() waits for its reply, so the server has accepted all of them.
        for _ in range(pair.point.connections):
            connect()
        gc.collect()
        count = pair.point.connections
        server_cost = (private_memory(pair.server_pid) - server_before) / count
        client_cost = (private_memory() - client_before) / count
        return Outcome([server_cost + client_cost],
                       {"server_KiB": server_cost / 1024, "client_KiB": client_cost / 1024})
    finally:
        for client in clients:
            client.close()


CASE: Case = Case(
    name="memory",
    title="Memory per idle connection (server + client private memory)",
    unit="KiB",
    lower_is_better=True,
    full_points=(Point(64, 200),),
    quick_points=(Point(64, 32),),
    full_timing=Timing(repetitions=3, warmup=0, warmup_cap=0.0, min_iterations=1, max_iterations=1, time_cap=0.0),
    quick_timing=Timing(repetitions=1, warmup=0, warmup_cap=0.0, min_iterations=1, max_iterations=1, time_cap=0.0),
    handler=echo,
    drive=drive_memory,
    server_mode="many",
    varies="connections",
    pinnings=("same",),
    raw_unit="bytes",
)

if __name__ == "__main__":
    from .harness import main

    raise SystemExit(main(cases=[CASE.name]))

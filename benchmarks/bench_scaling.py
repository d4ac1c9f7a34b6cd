"""Question: how do round trips hold up as concurrent clients grow?

N clients (all pinned to the client CPU; one process each up to 16, then 16
processes running N/16 connections from threads) each hold one connection
and do 64-byte round trips against one server for the same time window; the
record is the latency of a round trip under that load, with the aggregate
rate of all clients as an extra. Run alone: ``python -m benchmarks.bench_scaling``.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import threading
import time
from multiprocessing.connection import Connection

from .bench_roundtrip import echo
from .core import Case, Point, Timing
from .runner import READY_TIMEOUT, Outcome, Pair, fork_process, make_payload, measure, stop
from .transports.base import Client

__all__ = ["CASE"]


def _receive(conn: Connection, what: str) -> object:
    if not conn.poll(READY_TIMEOUT):
        raise TimeoutError(f"a client sent no {what} within {READY_TIMEOUT}s")
    return conn.recv()


# Up to this many client processes; beyond, each process drives several
# connections from threads (1000 processes would measure fork, not alpc).
MAX_PROCESSES = 16


def _client(pair: Pair, indices: list[int], control: Connection) -> None:
    """One client process: connect, warm up, say ready, wait for go, measure, report.

    With several connections, each runs in its own thread, so all of them
    are in flight at once as far as the server can tell.
    """
    payload = make_payload(pair.point.size)
    clients = [pair.transport.client(index) for index in indices]
    timing = pair.timing

    def run(client: Client, warm: bool, out: list[float]) -> None:
        def one() -> None:
            if len(client.request(payload)) != len(payload):
                raise AssertionError("a reply had the wrong length")

        if warm:
            warm_until = time.monotonic() + timing.warmup_cap
            for _ in range(timing.warmup):
                one()
                if time.monotonic() >= warm_until:
                    break
            return
        out.extend(measure(one, dataclasses.replace(timing, warmup=0)))

    def all_of(warm: bool) -> list[float]:
        samples: list[float] = []
        if len(clients) == 1:
            run(clients[0], warm, samples)
            return samples
        threads = [threading.Thread(target=run, args=(client, warm, samples)) for client in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(READY_TIMEOUT)
        return samples

    all_of(True)
    control.send("ready")
    if _receive(control, "go") != "go":
        raise RuntimeError("expected go")
    started = time.perf_counter()
    samples = all_of(False)
    control.send((samples, time.perf_counter() - started))
    for client in clients:
        client.close()


def drive_scaling(pair: Pair) -> Outcome:
    controls: list[Connection] = []
    pids: list[int] = []
    count = pair.point.connections
    groups = [list(range(start, count, MAX_PROCESSES)) for start in range(min(count, MAX_PROCESSES))]
    try:
        for indices in groups:
            mine, theirs = multiprocessing.Pipe()
            pids.append(fork_process(pair.job.client_cpu, functools.partial(_client, pair, indices, theirs)))
            theirs.close()
            controls.append(mine)
        for control in controls:
            if _receive(control, "ready") != "ready":
                raise RuntimeError("expected ready")
        for control in controls:
            control.send("go")
        samples: list[float] = []
        rate = 0.0
        for control in controls:
            got = _receive(control, "samples")
            assert isinstance(got, tuple)
            client_samples, elapsed = got
            samples.extend(client_samples)
            rate += len(client_samples) / elapsed
        return Outcome(samples, {"aggregate_rate": rate})
    finally:
        for pid in pids:
            stop(pid)
        for control in controls:
            control.close()


CASE: Case = Case(
    name="scaling",
    title="Round trip under N concurrent clients (64 B, one server)",
    unit="us",
    lower_is_better=True,
    full_points=(Point(64, 1), Point(64, 16), Point(64, 256), Point(64, 1000)),
    quick_points=(Point(64, 4),),
    # Two repetitions and at least 5 round trips per client: at 1000 clients a round
    # trip takes up to ~0.5 s for the slowest peers, and this case dominated the
    # full run's time (365 of 711 s with 3 and 20), past `make bench`'s 10 minutes.
    full_timing=Timing(repetitions=2, warmup=200, warmup_cap=0.05, min_iterations=5, max_iterations=50_000,
                       time_cap=0.3),
    quick_timing=Timing(repetitions=1, warmup=50, warmup_cap=0.02, min_iterations=10, max_iterations=5_000,
                        time_cap=0.06),
    handler=echo,
    drive=drive_scaling,
    server_mode="many",
    varies="connections",
    pre_channels_per_connection=True,
)

if __name__ == "__main__":
    from .harness import main

    raise SystemExit(main(cases=[CASE.name]))

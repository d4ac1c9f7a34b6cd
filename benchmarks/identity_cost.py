"""What per-message identity costs on the small-message path.

Every channel read is a recvmsg that also takes the sender's SCM_CREDENTIALS
(SO_PASSCRED), so each message names its sender. This measures a 64-byte ping-pong
between two processes through alpc's own Stream (the read path the channel uses:
``Stream.recv_fds``), with SO_PASSCRED on and off, in alternating repetitions,
pinned to one CPU (``same``) and to two (``split``), never mixed.

    python -m benchmarks.identity_cost [--rounds N] [--reps R]
"""

from __future__ import annotations

import os
import statistics
import sys

from alpc.transport import Stream, wait_readable

from .pingpong import arguments, pinnings, time_round_trips

__all__ = ["main", "measure"]

MESSAGE = b"x" * 64


def _read_one(stream: Stream) -> bytes:
    while True:
        got = stream.recv_fds(1)
        if got is not None:
            return got[0]
        wait_readable([stream.fileno()], None)


def _echo(stream: Stream, rounds: int) -> None:
    for _ in range(rounds):
        stream.send([_read_one(stream)])


def measure(rounds: int, passcred: bool, cpus: tuple[int, int]) -> float:
    """Median microseconds per round trip over ``rounds``, client on cpus[0], echo on cpus[1]."""
    client, server = Stream.pair()
    pid = os.fork()
    if pid == 0:
        client.close()
        os.sched_setaffinity(0, {cpus[1]})
        server.set_passcred(passcred)
        _echo(server, rounds + 100)
        os._exit(0)
    server.close()
    client.set_passcred(passcred)

    def ask() -> None:
        client.send([MESSAGE])
        _read_one(client)

    try:
        return time_round_trips(ask, rounds, 100, cpus[0])
    finally:
        os.waitpid(pid, 0)
        client.close()


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, argv)
    load = os.getloadavg()[0]
    print(f"64 B round trips through Stream.recv_fds, {args.rounds} per repetition, {args.reps} repetitions; "
          f"load average {load:.2f}")
    for name, cpus in pinnings().items():
        results: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.reps):
            for passcred in (False, True):  # interleaved, so noise falls on both
                results[passcred].append(measure(args.rounds, passcred, cpus))
        off, on = statistics.median(results[False]), statistics.median(results[True])
        print(f"{name:5} (cpus {cpus[0]}/{cpus[1]}): without credentials {off:.2f} us, with {on:.2f} us, "
              f"cost {on - off:+.2f} us per round trip ({(on - off) / 2:+.2f} us per read); "
              f"reps {min(results[False]):.2f}..{max(results[False]):.2f} / "
              f"{min(results[True]):.2f}..{max(results[True]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A worker pool passing large buffers between processes over alpc RPC (no numpy, no pickle).

The coordinator serves a task queue; worker processes connect, take a task (a
buffer of a few MiB), transform it and hand the result back. Buffers over the
inline threshold travel out of band, through the connection's shared-memory
section: the sender's buffer is copied once, straight into the section (never
joined with the rest of the message first), and the receiver gets a read-only
view of the message.

    python examples/worker_pool.py [--workers 3] [--tasks 12] [--size-mib 2]

A broker must be running (`alpc broker`). Prints OK and a summary on success.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections import deque

from alpc import rpc

# Each byte becomes its bitwise complement: easy to check, touches every byte.
INVERT = bytes(255 - b for b in range(256))


class TaskQueue(rpc.Interface, name="examples.pool", version=(1, 0)):
    @rpc.method
    def take(self) -> tuple[int, bytes] | None:
        """(task_id, payload), or None when there is no work left."""

    @rpc.method
    def done(self, task_id: int, result: bytes, worker_pid: int) -> None:
        """Hand back the result of a task."""


class Coordinator(TaskQueue):
    def __init__(self, payloads: list[bytes]) -> None:
        self._lock = threading.Lock()
        self._todo = deque(enumerate(payloads))
        self.expected = {i: hashlib.sha256(p.translate(INVERT)).hexdigest() for i, p in enumerate(payloads)}
        self.results: dict[int, tuple[str, int]] = {}
        self.finished = threading.Event()

    def take(self) -> tuple[int, bytes] | None:
        with self._lock:
            if not self._todo:
                return None
            task_id, payload = self._todo.popleft()
        # Items of a returned tuple that are large buffers go out of band, not copied.
        return task_id, payload

    def done(self, task_id: int, result: bytes, worker_pid: int) -> None:
        digest = hashlib.sha256(result).hexdigest()  # `result` is a read-only view of the message
        with self._lock:
            self.results[task_id] = (digest, worker_pid)
            if len(self.results) == len(self.expected):
                self.finished.set()


def work(name: str) -> int:
    """A worker process: take tasks until there are none, returning each result."""
    done = 0
    with rpc.connect(TaskQueue, name, timeout=10, call_timeout=30) as client:
        queue = client.proxy
        while (task := queue.take()) is not None:
            task_id, payload = task
            queue.done(task_id, bytes(payload).translate(INVERT), os.getpid())
            done += 1
    print(f"worker {os.getpid()}: {done} tasks", flush=True)
    return 0


def coordinate(args: argparse.Namespace) -> int:
    payloads = [os.urandom(int(args.size_mib * 1024 * 1024)) for _ in range(args.tasks)]
    coordinator = Coordinator(payloads)
    started = time.perf_counter()
    with rpc.Server(args.name, coordinator, workers=args.workers + 1):
        workers = [subprocess.Popen([sys.executable, __file__, "--worker", "--name", args.name])
                   for _ in range(args.workers)]
        finished = coordinator.finished.wait(args.timeout)
        codes = [proc.wait(args.timeout) for proc in workers]
    elapsed = time.perf_counter() - started
    wrong = [i for i, (digest, _) in coordinator.results.items() if digest != coordinator.expected[i]]
    if not finished or wrong or any(codes):
        print(f"FAILED: finished={finished} wrong={wrong} exit codes={codes}", flush=True)
        return 1
    pids = {pid for _, pid in coordinator.results.values()}
    moved = 2 * sum(map(len, payloads)) / (1024 * 1024)
    print(f"OK {args.tasks} tasks by {len(pids)} workers, {moved:.0f} MiB moved in {elapsed:.2f} s", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="examples.pool")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--size-mib", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return work(args.name) if args.worker else coordinate(args)


if __name__ == "__main__":
    sys.exit(main())

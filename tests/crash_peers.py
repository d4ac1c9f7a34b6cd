"""Peers for tests/test_crash_cleanup.py.

``forking-server NAME --runtime-dir DIR``: creates port NAME, then forks a
worker (as multiprocessing's fork start method does) that inherits every fd,
the port's broker registration socket included, and lives until its stdin
closes. Prints ``READY <server pid> <worker pid>``.
"""

from __future__ import annotations

import argparse
import os
import sys

import alpc


def forking_server(args: argparse.Namespace) -> None:
    port = alpc.create_port(args.name, config=alpc.Config.from_env(args.runtime_dir))
    worker = os.fork()
    if worker == 0:
        sys.stdin.read()
        os._exit(0)
    print("READY", os.getpid(), worker, flush=True)
    sys.stdin.read()
    port.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["forking-server"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    args = parser.parse_args()
    forking_server(args)


if __name__ == "__main__":
    main()

"""Peers for tests/test_restart_edges.py.

``orphan-registration NAME --runtime-dir DIR``: sends CREATE_PORT for NAME over a raw broker
connection, forks a worker that inherits that socket and lives until it is killed, prints
``READY <worker pid>`` and exits at once, before any answer: the broker reads the request of a
process that is gone, while the worker keeps the socket (and its EOF) open. With ``--linger``
it waits for the broker's answer before ``READY``, and exits only when its own stdin closes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import alpc
from alpc import control
from alpc.exchange import control_frame
from alpc.transport import Stream, deadline_after, wait_readable


def orphan_registration(args: argparse.Namespace) -> None:
    config = alpc.Config.from_env(args.runtime_dir)
    stream = Stream.connect(config.broker_socket, 5.0)
    stream.send(control_frame(control.CreatePort(name=args.name, max_message_length=65536, max_connect_data=4096,
                                                           max_pending_connects=16)), deadline=None)
    worker = os.fork()
    if worker == 0:
        signal.pause()  # until the test kills it (not stdin: the owner's own exit is driven by that)
        os._exit(0)
    if args.linger and not wait_readable([stream.fileno()], deadline_after(10)):
        os._exit(1)
    print("READY", worker, flush=True)
    if args.linger:
        sys.stdin.read()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["orphan-registration"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--linger", action="store_true")
    orphan_registration(parser.parse_args())


if __name__ == "__main__":
    main()

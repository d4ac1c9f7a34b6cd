"""The ``alpc`` command: run the broker, list ports, ping a port."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .broker import Broker, list_ports
from .config import Config
from .errors import AlpcError
from .port import connect

__all__ = ["main"]


def _config(args: argparse.Namespace) -> Config:
    return Config.from_env(args.runtime_dir)


def _cmd_broker(args: argparse.Namespace) -> int:
    broker = Broker(args.runtime_dir)

    def on_ready() -> None:
        print(f"READY {broker.socket_path}", flush=True)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"READY\n")
            os.close(args.ready_fd)

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("alpc.broker").info("received %s", signal.Signals(signum).name)
        broker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    broker.serve_forever(on_ready=on_ready)
    return 0


def _cmd_ports(args: argparse.Namespace) -> int:
    ports = list_ports(_config(args), timeout=args.timeout)
    if args.json:
        print(json.dumps([
            {"name": p.name, "pid": p.pid, "uid": p.uid, "gid": p.gid,
             "max_message_length": p.max_message_length,
             "clients": [{"pid": c.pid, "uid": c.uid, "gid": c.gid} for c in p.clients]}
            for p in ports
        ], indent=2))
        return 0
    if not ports:
        print("no ports")
        return 0
    width = max(len("NAME"), *(len(p.name) for p in ports))
    print(f"{'NAME':<{width}}  {'PID':>7}  {'UID':>6}  CLIENTS")
    for p in ports:
        clients = ", ".join(f"pid {c.pid}/uid {c.uid}" for c in p.clients) or "-"
        print(f"{p.name:<{width}}  {p.pid:>7}  {p.uid:>6}  {len(p.clients)}: {clients}")
    return 0


def _cmd_ping(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with connect(args.name, b"alpc ping", timeout=args.timeout, config=_config(args)) as comm:
        connected = time.perf_counter()
        samples = []
        for _ in range(args.count):
            t0 = time.perf_counter()
            comm.ping(timeout=args.timeout)
            samples.append(time.perf_counter() - t0)
    samples.sort()
    print(f"connected to {args.name!r} (server pid {comm.server.pid}, uid {comm.server.uid}) "
          f"in {(connected - started) * 1e3:.2f} ms")
    print(f"{len(samples)} round trips: min {samples[0] * 1e6:.1f} us, "
          f"median {samples[len(samples) // 2] * 1e6:.1f} us, max {samples[-1] * 1e6:.1f} us")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alpc", description="ALPC-style local IPC for Python")
    parser.add_argument("--runtime-dir", type=Path, default=None,
                        help="broker runtime directory (default: $ALPC_RUNTIME_DIR, "
                             "$XDG_RUNTIME_DIR/alpc, /tmp/alpc-$UID)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    broker = sub.add_parser("broker", help="run the broker daemon")
    broker.add_argument("--ready-fd", type=int, default=None, help="write READY to this fd once listening")
    broker.set_defaults(func=_cmd_broker)

    ports = sub.add_parser("ports", help="list live ports")
    ports.add_argument("--json", action="store_true")
    ports.add_argument("--timeout", type=float, default=5.0)
    ports.set_defaults(func=_cmd_ports)

    ping = sub.add_parser("ping", help="connect to a port and time round trips")
    ping.add_argument("name")
    ping.add_argument("--count", type=int, default=10)
    ping.add_argument("--timeout", type=float, default=5.0)
    ping.set_defaults(func=_cmd_ping)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except AlpcError as exc:
        print(f"alpc: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

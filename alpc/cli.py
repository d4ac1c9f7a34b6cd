"""The ``alpc`` command: run the broker, look inside it, ping a port."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

from . import control, logs
from .broker import Broker, list_ports
from .config import Config
from .daemon import ServiceNotifier, activation_listen_fd
from .errors import ActivationError, AlpcError, BrokerUnavailable, PortNotFound
from .introspect import latency_percentile, list_peers, port_stats
from .port import connect
from .quotas import BROKER_DEFAULTS, MAX_LIMIT, BrokerLimits

__all__ = ["main"]

log = logging.getLogger(__name__)

_CLEAR = "\x1b[H\x1b[2J"


def _config(args: argparse.Namespace) -> Config:
    return Config.from_env(args.runtime_dir)


def _one_line(message: object) -> str:
    """An error's text as one line of plain text: it may quote what a peer chose (a server's reject
    reason), which must neither forge lines under ours nor send escape sequences to the terminal."""
    text = str(message)
    return text if text.isprintable() else repr(text)[1:-1]


# -- broker -------------------------------------------------------------------------


# How long a broker that stops waits for its READY line to reach a stdout nobody reads.
_ANNOUNCE_JOIN = 1.0


def _announce(line: str) -> threading.Thread:
    """Print the READY line from a thread of its own: a stdout pipe that is full (its reader
    stalled) blocked the broker in write(2) before it served anyone."""
    thread = threading.Thread(target=_write_line, args=(line,), name="alpc-announce", daemon=True)
    thread.start()
    return thread


def _write_line(line: str) -> None:
    """A stdout nobody reads any more (EPIPE) must not stop the daemon."""
    if sys.stdout is None:  # started with fd 1 closed
        return
    data = memoryview(f"{line}\n".encode())
    try:
        fd = sys.stdout.fileno()
        while data:  # os.write, not print: no lock of sys.stdout is held while it blocks
            data = data[os.write(fd, data):]
    except OSError as exc:
        log.warning("cannot write %r to stdout: %s", line, exc)
        # What stdout still buffers goes nowhere, or the flush at exit fails again.
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(devnull, sys.stdout.fileno(), inheritable=False)
        os.close(devnull)


def _cmd_broker(args: argparse.Namespace) -> int:
    if args.ready_fd is not None:
        # Before the broker opens anything: a number that is no open fd now would name the
        # broker's own lock or socket by the time READY is written there (and closed).
        os.fstat(args.ready_fd)
    notifier = ServiceNotifier()
    listen_fd = activation_listen_fd()
    if listen_fd is not None and args.replace:
        raise ActivationError("--replace takes the socket from the running broker; "
                              "a socket-activated broker gets it from its service manager")
    limits = BrokerLimits(max_connections_per_uid=args.max_connections_per_uid,
                          max_ports_per_uid=args.max_ports_per_uid)

    def serving(counts: str) -> str:
        # Every STATUS= names the socket, not only READY's: the tick's updates replaced it.
        return f"serving {broker.socket_path}: {counts}"

    broker = Broker(args.runtime_dir, listen_fd=listen_fd, replace=args.replace,
                    on_status=lambda counts: notifier.status(serving(counts)),
                    on_stopping=lambda reason: notifier.stopping(f"stopping: {reason}"), shared=args.shared,
                    limits=limits)

    announcing: list[threading.Thread] = []

    def on_ready() -> None:
        announcing.append(_announce(f"READY {broker.socket_path}"))
        if args.ready_fd is not None:
            try:
                os.write(args.ready_fd, b"READY\n")
            except OSError as exc:  # its reader went away (EPIPE): the broker serves on, as for stdout
                log.warning("cannot write READY to --ready-fd %d: %s", args.ready_fd, exc)
            os.close(args.ready_fd)
        notifier.ready(serving(broker.status_line()))

    def on_signal(signum: int, _frame: object) -> None:
        broker.stop(reason=f"received {signal.Signals(signum).name}")

    # SIGHUP too: the terminal it was started from went away. Its default action would kill the
    # broker without telling servers, leaving its socket and lock files behind.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # As Python does for SIGINT: one ignored on entry (nohup, a script's background job) stays so.
        if signum == signal.SIGTERM or signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, on_signal)
    broker.serve_forever(on_ready=on_ready)
    for thread in announcing:  # its warning, if stdout is gone, is logged before the broker exits
        thread.join(_ANNOUNCE_JOIN)
    if broker.handed_over_to is not None:
        notifier.stopping(f"handed over to pid {broker.handed_over_to}")
    return 0


# -- introspection ----------------------------------------------------------------------


def _unusable_runtime_dir(config: Config) -> bool:
    """Is the runtime dir a path no broker can ever listen in (a regular file, or under one)?
    A missing dir is not: the broker makes it when it starts."""
    try:
        return not stat.S_ISDIR(os.stat(config.runtime_dir).st_mode)
    except NotADirectoryError:
        return True
    except OSError:
        return False


def _watch(args: argparse.Namespace, render: Callable[[], str]) -> int:
    """Print ``render()`` once, or refresh it every ``--interval`` with ``--watch``."""
    if not args.watch:
        print(render())
        return 0
    shown = 0
    clear = sys.stdout.isatty()
    while args.count is None or shown < args.count:
        try:
            text = render()
        except (BrokerUnavailable, PortNotFound) as exc:
            if isinstance(exc, BrokerUnavailable) and _unusable_runtime_dir(_config(args)):
                raise  # no restart can end this: waiting would go on for ever
            # Keep watching: the broker may be restarting, and a port is back only once its
            # server registered again with the new broker.
            text = _json_line({"error": type(exc).__name__, "message": str(exc)}) if args.json \
                else f"{'broker unavailable' if isinstance(exc, BrokerUnavailable) else 'port not found'}: {exc}"
        if args.json:
            print(text, flush=True)  # JSON Lines: a header or a screen clear would break every parser
        else:
            stamp = time.strftime("%H:%M:%S")
            print(f"{_CLEAR if clear else ''}--- {stamp} (every {args.interval:g}s, Ctrl-C to stop)\n{text}",
                  flush=True)
        shown += 1
        if args.count is None or shown < args.count:
            # handshake-free: this is the refresh period the user asked for.
            time.sleep(args.interval)
    return 0


def _json_line(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _dumps(value: object, as_json: bool | str) -> str:
    """``as_json`` "lines" (``--json --watch``): one document per line, so a script reads each refresh."""
    return _json_line(value) if as_json == "lines" else json.dumps(value, indent=2)


def _json_mode(args: argparse.Namespace) -> bool | str:
    return "lines" if args.json and args.watch else bool(args.json)


def _cmd_ports(args: argparse.Namespace) -> int:
    return _watch(args, lambda: _render_ports(list_ports(_config(args), timeout=args.timeout), _json_mode(args)))


def _render_ports(ports: tuple[control.PortInfo, ...], as_json: bool | str) -> str:
    if as_json:
        return _dumps([asdict(port) for port in ports], as_json)
    if not ports:
        return "no ports"
    width = max(len("NAME"), *(len(p.name) for p in ports))
    lines = [f"{'NAME':<{width}}  {'PID':>7}  {'UID':>6}  CLIENTS"]
    for p in ports:
        if p.details:
            clients = f"{len(p.clients)}: " + (", ".join(f"pid {c.pid}/uid {c.uid}" for c in p.clients) or "-")
        else:
            clients = "(not shown: to this uid, or to keep the answer within its size limit)"
        lines.append(f"{p.name:<{width}}  {p.pid:>7}  {p.uid:>6}  {clients}")
    return "\n".join(lines)


def _cmd_peers(args: argparse.Namespace) -> int:
    return _watch(args, lambda: _render_peers(list_peers(args.name, _config(args), timeout=args.timeout),
                                              _json_mode(args)))


def _age(ms: int) -> str:
    return "never" if ms < 0 else f"{ms / 1000:.1f}s"


def _render_peers(listing: control.PeerList, as_json: bool | str) -> str:
    if as_json:
        return _dumps(asdict(listing), as_json)
    head = (f"port {listing.name} (server pid {listing.pid}): {listing.peers_total} clients, "
            f"reported {_age(listing.report_age_ms)} ago")
    if not listing.peers:
        return head
    lines = [head, f"{'PID':>7} {'UID':>6} {'CONNECTED':>10} {'QUEUE':>6} {'IN-FLIGHT':>9} {'OLDEST':>8} "
                   f"{'MSGS IN':>9} {'MSGS OUT':>9} {'BYTES IN':>11} {'BYTES OUT':>11} {'ERRORS':>6} {'SECTIONS':>9}"]
    for p in listing.peers:
        oldest = f"{p.in_flight_ages_ms[0] / 1000:.2f}s" if p.in_flight_ages_ms else "-"
        lines.append(f"{p.pid:>7} {p.uid:>6} {p.connected_ms / 1000:>9.1f}s {p.queue_depth:>6} {p.in_flight:>9} "
                     f"{oldest:>8} {p.messages_in:>9} {p.messages_out:>9} {p.bytes_in:>11} {p.bytes_out:>11} "
                     f"{p.errors:>6} {p.section_bytes:>9}")
    if listing.peers_total > len(listing.peers):
        lines.append(f"... and {listing.peers_total - len(listing.peers)} more")
    return "\n".join(lines)


def _cmd_stats(args: argparse.Namespace) -> int:
    return _watch(args, lambda: _render_stats(port_stats(args.name or "", _config(args), timeout=args.timeout),
                                              _json_mode(args), bool(args.name)))


def _micros(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "long"
    return f"<{value / 1000:g}ms" if value >= 1000 else f"<{value:g}us"


def _render_stats(stats: control.StatsList, as_json: bool | str, histogram: bool) -> str:
    if as_json:
        return _dumps(asdict(stats), as_json)
    quota = stats.broker
    lines = [f"broker up {stats.uptime_ms / 1000:.0f}s ({'shared' if quota.shared else 'private'}); "
             f"connects to unknown ports {stats.connects_unknown_port}; protocol errors {stats.protocol_errors}",
             f"per-uid quotas: {quota.max_connections_per_uid} connections, {quota.max_ports_per_uid} ports; refused: "
             f"{quota.refused_connections} connections, {quota.refused_ports} ports, {quota.refused_acl} by ACLs"]
    lines += [f"  uid {u.uid}: {u.connections} connections, {u.ports} ports" for u in quota.usage]
    if not stats.ports:
        return "\n".join([*lines, "no ports"])
    width = max(len("NAME"), *(len(p.name) for p in stats.ports))
    lines.append(f"{'NAME':<{width}} {'PID':>7} {'CONNS':>5} {'MSGS IN':>9} {'MSGS OUT':>9} {'BYTES IN':>11} "
                 f"{'BYTES OUT':>11} {'ERRORS':>6} {'QUOTA':>5} {'REFUSED':>7} {'P50':>8} {'P99':>8} {'REPORTED':>8}")
    for p in stats.ports:
        c = p.counters
        lines.append(f"{p.name:<{width}} {p.pid:>7} {p.connections:>5} {c.messages_in:>9} {c.messages_out:>9} "
                     f"{c.bytes_in:>11} {c.bytes_out:>11} {c.errors:>6} {p.quota_refusals:>5} "
                     f"{p.connects_refused + c.connects_rejected:>7} "
                     f"{_micros(latency_percentile(c.latency_us, 0.5)):>8} "
                     f"{_micros(latency_percentile(c.latency_us, 0.99)):>8} {_age(p.report_age_ms):>8}")
        if histogram:
            lines.extend(_histogram(c.latency_us))
    return "\n".join(lines)


def _histogram(buckets: tuple[int, ...]) -> list[str]:
    total = sum(buckets)
    if not total:
        return ["  no requests served yet"]
    lines = ["  request service time (receipt to reply):"]
    for bucket, count in enumerate(buckets):
        if count:
            label = _micros(float(2**bucket) if bucket < len(buckets) - 1 else float("inf"))
            lines.append(f"  {label:>9} {count:>9} {'#' * max(1, round(40 * count / total))}")
    return lines


# -- ping -----------------------------------------------------------------------------


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


# -- arguments ---------------------------------------------------------------------------


# time.sleep() takes at most ~292 years; a refresh period is far below a day anyway.
_MAX_INTERVAL = 86400.0


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value <= _MAX_INTERVAL:  # NaN and inf too: inf made time.sleep raise OverflowError
        raise argparse.ArgumentTypeError(f"must be > 0 and at most {_MAX_INTERVAL:g} seconds, got {text}")
    return value


def _timeout(text: str) -> float:
    value = float(text)
    if not value >= 0:  # a negative or NaN timeout raised ValueError with a traceback
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a positive integer up to {MAX_LIMIT}, got {text!r}")
    return value


# The largest fd number a C int (os.write's argument) holds.
_MAX_FD = 2**31 - 1


def _ready_fd(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an fd number, got {text!r}") from None
    # 0-2 are closed after READY: the next socket the broker accepts would take the number, and
    # what it logs (to fd 2) or prints would go to a client.
    if not 3 <= value <= _MAX_FD:
        raise argparse.ArgumentTypeError(f"must be an open fd from 3 to {_MAX_FD}, not stdin/stdout/stderr, "
                                         f"got {text!r}")
    return value


def _runtime_dir(text: str) -> Path:
    # Path("") is ".": an empty value (an unset shell variable) put the broker in the cwd.
    if not text:
        raise argparse.ArgumentTypeError("must be a directory path, got an empty string")
    return Path(text)


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line and exit 1, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_view_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=_timeout, default=5.0)
    parser.add_argument("--watch", action="store_true", help="refresh a live view until interrupted")
    parser.add_argument("--interval", type=_positive, default=1.0, help="seconds between refreshes (--watch)")
    parser.add_argument("--count", type=_count, default=None, help="stop after this many refreshes (--watch)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alpc", description="ALPC-style local IPC for Python")
    parser.add_argument("--runtime-dir", type=_runtime_dir, default=None,
                        help="broker runtime directory (default: $ALPC_RUNTIME_DIR, "
                             "$XDG_RUNTIME_DIR/alpc, /tmp/alpc-$UID)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        type=str.upper)
    sub = parser.add_subparsers(dest="command", required=True)

    broker = sub.add_parser("broker", help="run the broker daemon")
    broker.add_argument("--ready-fd", type=_ready_fd, default=None, help="write READY to this fd once listening")
    broker.add_argument("--replace", action="store_true",
                        help="take over the running broker's socket and connections (graceful restart)")
    broker.add_argument("--shared", action="store_true",
                        help="serve every local user: a 0755 runtime dir and a 0666 socket; each port's ACL "
                             "decides who may connect to it (default: only this uid can reach the broker)")
    broker.add_argument("--max-connections-per-uid", type=_count, default=BROKER_DEFAULTS.max_connections_per_uid,
                        help="sockets one uid may have open to the broker at once")
    broker.add_argument("--max-ports-per-uid", type=_count, default=BROKER_DEFAULTS.max_ports_per_uid,
                        help="ports one uid may own")
    broker.set_defaults(func=_cmd_broker)

    ports = sub.add_parser("ports", help="list live ports")
    _add_view_options(ports)
    ports.set_defaults(func=_cmd_ports)

    peers = sub.add_parser("peers", help="the clients of a port: identity, queue, requests in flight")
    peers.add_argument("name")
    _add_view_options(peers)
    peers.set_defaults(func=_cmd_peers)

    stats = sub.add_parser("stats", help="counters per port: messages, bytes, errors, refusals, latency")
    stats.add_argument("name", nargs="?", default=None, help="one port (adds its latency histogram)")
    _add_view_options(stats)
    stats.set_defaults(func=_cmd_stats)

    ping = sub.add_parser("ping", help="connect to a port and time round trips")
    ping.add_argument("name")
    ping.add_argument("--count", type=_count, default=10, help="round trips to time")
    ping.add_argument("--timeout", type=_timeout, default=5.0,
                      help="seconds for each wait: the connect, and every round trip on its own")
    ping.set_defaults(func=_cmd_ping)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level)
    try:
        return int(args.func(args))
    except (AlpcError, OSError) as exc:  # OSError: a runtime dir that cannot be made, a --ready-fd not open...
        logs.flush_handlers()  # the lines logged before it come first (a thread writes them)
        print(f"alpc: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

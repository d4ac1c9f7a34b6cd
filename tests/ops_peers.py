"""Helper processes for the operations tests: an activator, a uid-dropping runner, servers, connectors.

Run as ``python tests/ops_peers.py ROLE ...``; every role prints ``READY`` once
set up and one line per event, so tests synchronise on lines, never on sleeps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

import alpc
import alpc.cli


def say(*parts: object) -> None:
    print(*parts, flush=True)


def activate(argv: list[str]) -> None:
    """Play systemd's socket activation: fd 3 = the listening socket, LISTEN_PID = the exec'ed pid."""
    fd = int(argv[0])
    command = argv[argv.index("--") + 1:]
    if fd != 3:
        os.dup2(fd, 3, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(3, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_FDNAMES"] = "broker.sock"
    os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
    os.execv(command[0], command)


def as_uid(argv: list[str]) -> None:
    """Run the ``alpc`` command as another uid (everything is imported before the switch).

    ``as-uid UID [--groups G1,G2] -- ARGS``: the supplementary groups to keep (none by default).
    """
    uid = int(argv[0])
    split = argv.index("--")
    options = argv[1:split]
    groups = [int(g) for g in options[options.index("--groups") + 1].split(",")] if "--groups" in options else []
    command = argv[split + 1:]
    # The interpreter lives under root's home: import what argparse, logging and
    # json load lazily while we may still read it.
    alpc.cli._parser().parse_args(command)
    json.dumps({})
    logging.getLogger("warm-up").handlers.clear()
    os.setgroups(groups)
    os.setgid(uid)
    os.setuid(uid)
    sys.exit(alpc.cli.main(command))


def server(args: argparse.Namespace) -> None:
    """Echo server on one wait() loop; reports a lost registration and keeps serving."""
    config = alpc.Config.from_env(args.runtime_dir)
    with alpc.create_port(args.name, config=config, reregister_timeout=args.reregister_timeout,
                          report_interval=args.report_interval) as port:
        say("READY", os.getpid())
        while True:
            try:
                event = port.wait(timeout=args.timeout)
            except (alpc.NameInUse, alpc.BrokerUnavailable) as exc:
                say("LOST", type(exc).__name__, str(exc).replace(" ", "_"))
                continue
            if isinstance(event, alpc.ConnectionRequest):
                event.accept()
                say("ACCEPTED", event.client.pid, port.registrations)
            elif event.type is alpc.MessageType.REQUEST:
                event.reply(event.data.upper())


def connector(args: argparse.Namespace) -> None:
    """On "go", ``--count`` concurrent connect+request+close; prints DONE ok=N failed=M."""
    config = alpc.Config.from_env(args.runtime_dir)
    say("READY", os.getpid())
    sys.stdin.readline()
    results: list[str] = []

    def one(index: int) -> None:
        try:
            with alpc.connect(args.name, timeout=args.timeout, config=config,
                              retry_timeout=args.retry_timeout) as comm:
                reply = comm.request(f"c{index}".encode(), timeout=args.timeout)
                results.append("ok" if reply.data == f"C{index}".encode() else f"bad:{reply.data!r}")
        except alpc.AlpcError as exc:
            results.append(f"{type(exc).__name__}:{exc}".replace(" ", "_"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.count)]
    for thread in threads:
        thread.start()
    say("CONNECTING")
    for thread in threads:
        thread.join()
    failed = [r for r in results if r != "ok"]
    say("DONE", f"ok={results.count('ok')}", f"failed={len(failed)}", *failed[:5])


def main() -> None:
    if sys.argv[1] == "activate":
        activate(sys.argv[2:])
    if sys.argv[1] == "as-uid":
        as_uid(sys.argv[2:])
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "connector"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--reregister-timeout", type=float, default=30.0)
    parser.add_argument("--report-interval", type=float, default=0.05)
    parser.add_argument("--retry-timeout", type=float, default=0.0)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    {"server": server, "connector": connector}[args.role](args)


if __name__ == "__main__":
    main()

"""Peers for the security tests (test_broker_fd_limits, test_security_groups,
test_security_runtime_dir), run as another uid.

``python tests/security_peers.py ports RUNTIME_DIR UID GROUPS`` drops to UID with the
comma-separated supplementary GROUPS (after every import) and prints ``PORTS`` and the
names of the ports the broker lets it inspect, or ``ERROR`` and the exception's name.

``python tests/security_peers.py impostor RUNTIME_DIR UID ""`` drops to UID, runs a broker in
RUNTIME_DIR (which it creates, so it owns it) and serves a port ``svc.trusted`` that admits
everyone, accepting every connect; prints ``READY``, then ``CONNECT`` and the connect data
of each client, and ``BYE`` when stdin closes.

``python tests/security_peers.py broker RUNTIME_DIR UID SOFT[:HARD]`` runs a shared broker as UID in
RUNTIME_DIR with a soft RLIMIT_NOFILE of SOFT (and HARD, else the hard limit as it is: a
service manager's default is 1024 and 524288); prints ``READY``, then ``BYE`` once stdin
closed and the broker stopped.
"""

from __future__ import annotations

import os
import resource
import sys
import threading

import alpc
from alpc.broker import list_ports


def become(uid: int, groups: str) -> None:
    os.setgroups([int(gid) for gid in groups.split(",") if gid])
    os.setgid(uid)
    os.setuid(uid)


def ports(runtime_dir: str) -> None:
    try:
        names = [port.name for port in list_ports(alpc.Config.from_env(runtime_dir), timeout=10)]
    except alpc.AlpcError as exc:
        print("ERROR", type(exc).__name__, flush=True)
        return
    print("PORTS", *names, flush=True)


def impostor(runtime_dir: str) -> None:
    config = alpc.Config.from_env(runtime_dir)
    with alpc.Broker(runtime_dir, shared=True), \
            alpc.create_port("svc.trusted", alpc.PortAttributes(acl=alpc.PortAcl(allow_everyone=True)),
                             config=config) as port:
        def serve() -> None:
            while True:
                try:
                    request = port.listen(timeout=60)
                except alpc.AlpcError:
                    return
                print("CONNECT", request.data.decode(), flush=True)
                request.accept()
        threading.Thread(target=serve, daemon=True).start()
        print("READY", flush=True)
        sys.stdin.read()
    print("BYE", flush=True)


def broker(runtime_dir: str, limits: str) -> None:
    soft, _, hard = limits.partition(":")
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (int(soft), int(hard) if hard else resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    with alpc.Broker(runtime_dir, shared=True):
        print("READY", flush=True)
        sys.stdin.read()
    print("BYE", flush=True)


def main() -> None:
    role, runtime_dir, uid, extra = sys.argv[1:5]
    if role == "broker":
        become(int(uid), "")
        broker(runtime_dir, extra)
        return
    become(int(uid), extra)
    if role == "ports":
        ports(runtime_dir)
    elif role == "impostor":
        impostor(runtime_dir)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()

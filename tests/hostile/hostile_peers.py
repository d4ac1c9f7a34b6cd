"""Real processes for the security and hostile-peer tests.

Run as ``python tests/hostile/hostile_peers.py ROLE NAME ...``. Every role prints
``READY ...`` once set up and one line per event, so the tests synchronise on
lines, never on sleeps. ``--as-user UID`` drops to that uid (and ``--groups``)
after every import: the interpreter lives under /root, which is 0700.

- ``server``: one ``wait()`` loop serving every client; its port's ACL, limits
  and handle kinds come from the options. Requests: ``echo:TEXT`` answers
  ``TEXT`` upper-cased, ``big:N`` answers N bytes, ``push:N`` sends N datagrams
  first, ``fd:memfd`` answers with a
  memfd attached, anything else ``ok``.
  ``--pause-after N``: after accepting N clients, take nothing more until stdin
  says ``go``. stdin: ``go``, ``fds`` (the open fd count), ``conns``.
- ``client``: connects (``--server-uid`` pins the server), then obeys stdin:
  ``request TEXT``, ``send TEXT``, ``sendfd KIND``, ``datagrams N TIMEOUT``,
  ``requestfd KIND``, ``setuid UID``, ``flood N`` (N raw requests, never reading a reply), ``other
  NAME`` (a request on a second connection, to another port), ``sendfds N KIND
  TIMEOUT``, ``burst N TIMEOUT`` (N requests from N threads), ``close``.
- ``hog``: holds ``--count`` connections to the broker, or as many as it allows.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import tempfile
import threading

import alpc
from alpc import control
from alpc.exchange import control_frame
from alpc.wire import HEADER_SIZE, MessageType

_SAY = threading.Lock()


def say(*parts: object) -> None:
    line = " ".join(str(part).replace(" ", "_") if i else str(part) for i, part in enumerate(parts)) + "\n"
    with _SAY:
        sys.stdout.write(line)
        sys.stdout.flush()


def become(args: argparse.Namespace) -> None:
    if args.as_user is None:
        return
    groups = [int(g) for g in args.groups.split(",") if g] if args.groups else []
    os.setgroups(groups)
    os.setgid(args.as_user if args.as_group is None else args.as_group)
    os.setuid(args.as_user)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def kinds(text: str) -> frozenset[str]:
    return frozenset(kind for kind in text.split(",") if kind)


# -- server ----------------------------------------------------------------------------


def port_attributes(args: argparse.Namespace) -> alpc.PortAttributes:
    acl = alpc.PortAcl(allow_uids=set(args.allow_uid), allow_gids=set(args.allow_gid), deny_uids=set(args.deny_uid),
                       deny_gids=set(args.deny_gid), allow_root=args.allow_root, allow_everyone=args.everyone)
    return alpc.PortAttributes(
        acl=acl, handle_kinds=kinds(args.kinds), max_handles_per_message=args.max_handles,
        max_inflight_handles=args.max_inflight, max_pending_requests=args.max_pending,
        max_queued_datagrams=args.max_datagrams, max_connections=args.max_connections,
        max_pending_connects=args.max_pending_connects, send_timeout=args.send_timeout,
        refuse_identity_change=args.refuse_identity_change, inline_threshold=args.inline_threshold,
        quick_lpc=args.quick,
    )


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.gate = threading.Event()
        self.gate.set()
        self.port: alpc.ConnectionPort | None = None
        self.accepted = 0

    def run(self) -> None:
        config = alpc.Config.from_env(self.args.runtime_dir)
        with alpc.create_port(self.args.name, port_attributes(self.args), config=config) as port:
            self.port = port
            threading.Thread(target=self.commands, daemon=True).start()
            say("READY", os.getpid(), os.getuid())
            while True:
                self.gate.wait()
                event = port.wait(timeout=self.args.timeout)
                if isinstance(event, alpc.ConnectionRequest):
                    event.accept()
                    say("ACCEPTED", event.client.pid, event.client.uid, ",".join(map(str, event.groups)) or "-")
                    self.accepted += 1
                    if self.accepted == self.args.pause_after:
                        # Stop taking messages from here (deterministically, from this very loop).
                        self.gate.clear()
                        say("PAUSED")
                else:
                    self.handle(event)

    def handle(self, message: alpc.Message) -> None:
        kind = message.type
        if kind not in (alpc.MessageType.REQUEST, alpc.MessageType.DATAGRAM):
            say(kind.name, message.sender.pid, message.reason)
            return
        handles = message.take_handles()
        for handle in handles:
            os.close(handle.fd)
        say(kind.name, message.sender.pid, message.sender.uid, f"changed={message.identity_changed}",
            f"fds={','.join(h.kind for h in handles) or '-'}",
            f"refused={','.join(message.refused_handles) or '-'}", message.data[:40].decode(errors="replace"))
        if kind is alpc.MessageType.REQUEST:
            data = message.data
            if data.startswith(b"echo:"):
                answer = data[5:].upper()
            elif data.startswith(b"big:"):
                answer = b"b" * int(data[4:])
            elif data.startswith(b"push:"):
                for _ in range(int(data[5:])):
                    message.port.send(b"pushed datagram", timeout=5)
                answer = b"pushed"
            else:
                answer = b"ok"
            passed: list[int] = []
            if data == b"fd:memfd":
                passed.append(os.memfd_create("from-the-server"))
                os.write(passed[0], b"written by the server")
            try:
                message.reply(answer, fds=passed)
            except alpc.HandleNotAllowed as exc:  # the client takes no fds of this kind
                say("UNANSWERED", message.sender.pid, type(exc).__name__, str(exc))
                message.reply(b"refused")
            except (alpc.ConnectionClosed, alpc.Timeout) as exc:
                say("UNANSWERED", message.sender.pid, type(exc).__name__, str(exc))
            finally:
                for fd in passed:
                    os.close(fd)

    def commands(self) -> None:
        for line in sys.stdin:
            command = line.strip()
            if command == "go":
                self.gate.set()
                say("GOING")
            elif command == "fds":
                say("FDS", open_fds())
            elif command == "conns" and self.port is not None:
                say("CONNS", len(self.port.connections))


# -- client ----------------------------------------------------------------------------


def make_fd(kind: str) -> tuple[int, list[int]]:
    """An fd of ``kind`` to pass, and every fd to close afterwards."""
    if kind == "pipe":
        read_end, write_end = os.pipe()
        return read_end, [read_end, write_end]
    if kind == "socket":
        left, right = socket.socketpair()
        pair = [left.detach(), right.detach()]
        return pair[0], pair
    if kind == "memfd":
        fd = os.memfd_create("passed")
        return fd, [fd]
    if kind == "directory":
        fd = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)
        return fd, [fd]
    fd = os.open("/dev/null", os.O_RDONLY)
    return fd, [fd]


def comm_config(args: argparse.Namespace) -> alpc.Config:
    return alpc.Config(runtime_dir=alpc.Config.from_env(args.runtime_dir).runtime_dir,
                       handle_kinds=kinds(args.kinds), max_handles_per_message=args.max_handles)


def client(args: argparse.Namespace) -> None:
    config = comm_config(args)
    try:
        comm = alpc.connect(args.name, data=b"hello", timeout=args.timeout, config=config,
                            server_uid=args.server_uid)
    except alpc.AlpcError as exc:
        limit = getattr(exc, "limit", "") or "-"
        say("REFUSED", type(exc).__name__, limit, str(exc))
        return
    say("READY", os.getpid(), comm.server.pid, comm.server.uid)
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        try:
            obey(comm, command, rest, args)
        except alpc.AlpcError as exc:
            say("ERROR", type(exc).__name__, getattr(exc, "limit", "") or "-", str(exc))


def obey(comm: alpc.CommunicationPort, command: str, rest: str, args: argparse.Namespace) -> None:
    if command == "request":
        say("REPLY", comm.request(rest.encode(), timeout=args.timeout).data.decode())
    elif command == "send":
        comm.send(rest.encode(), timeout=args.timeout)
        say("SENT")
    elif command == "sendfd":
        fd, opened = make_fd(rest)
        try:
            comm.send(f"fd:{rest}".encode(), timeout=args.timeout, fds=[fd])
        finally:
            for each in opened:
                os.close(each)
        say("SENT")
    elif command == "requestfd":
        fd, opened = make_fd(rest)
        try:
            say("REPLY", comm.request(b"echo:with-fd", timeout=args.timeout, fds=[fd]).data.decode(),
                f"quick={comm.quick}")
        finally:
            for each in opened:
                os.close(each)
    elif command == "sendfds":
        count, kind, timeout = rest.split()
        sent = 0
        for _ in range(int(count)):
            fd, opened = make_fd(kind)
            try:
                comm.send(b"fd", timeout=float(timeout), fds=[fd])
            except alpc.Throttled as exc:
                say("THROTTLED", sent, exc.limit)
                return
            finally:
                for each in opened:
                    os.close(each)
            sent += 1
        say("SENT", sent)
    elif command == "burst":
        burst(comm, rest)
    elif command == "datagrams":
        count, timeout = rest.split()
        sent = 0
        try:
            for _ in range(int(count)):
                comm.send(b"d", timeout=float(timeout))
                sent += 1
        except alpc.Throttled as exc:
            say("THROTTLED", sent, exc.limit)
            return
        say("SENT", sent)
    elif command == "setuid":
        uid = int(rest)
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        say("SETUID", os.getuid())
    elif command == "flood":
        # A client that sends and never reads: its replies pile up in its own socket.
        for _ in range(int(rest)):
            _, frames = comm._channel.request(b"big:60000")
            comm._stream.send(frames, deadline=None)
        say("FLOODED")
    elif command == "other":
        with alpc.connect(rest, timeout=args.timeout, config=comm_config(args)) as other:
            say("OTHER", other.request(b"echo:fine", timeout=args.timeout).data.decode())
    elif command == "close":
        comm.close()
        say("CLOSED")


def burst(comm: alpc.CommunicationPort, rest: str) -> None:
    """N requests at once from N threads, each with TIMEOUT: how many got a reply, were throttled, timed out."""
    count, timeout = rest.split()
    outcomes: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            comm.request(b"echo:burst", timeout=float(timeout))
            outcome = "replies"
        except alpc.Throttled as exc:
            outcome = f"throttled:{exc.limit}"
        except alpc.Timeout:
            outcome = "timeouts"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=one) for _ in range(int(count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    say("BURST", *(f"{name}={outcomes.count(name)}" for name in sorted(set(outcomes))))


def hog(args: argparse.Namespace) -> None:
    """Hold as many connections to the broker as it allows (each proven held by a query it answers)."""
    path = str(alpc.Config.from_env(args.runtime_dir).broker_socket)
    held: list[socket.socket] = []
    query = b"".join(control_frame(control.ListPorts()))
    for number in range(args.count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(args.timeout)
        sock.connect(path)
        try:
            sock.sendall(query)
        except (BrokenPipeError, ConnectionResetError):
            pass  # turned away at accept: the refusal was written before the hang-up, read it
        header = sock.recv(HEADER_SIZE, socket.MSG_WAITALL)
        if len(header) < HEADER_SIZE:
            raise SystemExit(f"the broker hung up on connection {number} without a word")
        body = sock.recv(struct.unpack_from("<I", header, 8)[0], socket.MSG_WAITALL)
        if header[3] == MessageType.ERROR:
            refusal = control.decode_body(MessageType.ERROR, body, control.ErrorReply)
            say("REFUSED", number, refusal.limit)
            sock.close()
            break
        held.append(sock)
    say("HELD", len(held))
    sys.stdin.readline()
    for sock in held:
        sock.close()
    say("RELEASED")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client", "hog"])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--as-user", type=int, default=None)
    parser.add_argument("--groups", default="")
    parser.add_argument("--as-group", type=int, default=None, help="the gid to take with --as-user (default: the uid)")
    parser.add_argument("--allow-uid", type=int, action="append", default=[])
    parser.add_argument("--allow-gid", type=int, action="append", default=[])
    parser.add_argument("--deny-uid", type=int, action="append", default=[])
    parser.add_argument("--deny-gid", type=int, action="append", default=[])
    parser.add_argument("--allow-root", action="store_true")
    parser.add_argument("--everyone", action="store_true")
    parser.add_argument("--kinds", default="")
    parser.add_argument("--max-handles", type=int, default=16)
    parser.add_argument("--max-inflight", type=int, default=64)
    parser.add_argument("--max-pending", type=int, default=1024)
    parser.add_argument("--max-datagrams", type=int, default=1024)
    parser.add_argument("--max-connections", type=int, default=4096)
    parser.add_argument("--max-pending-connects", type=int, default=128)
    parser.add_argument("--send-timeout", type=float, default=5.0)
    parser.add_argument("--inline-threshold", type=int, default=256)
    parser.add_argument("--refuse-identity-change", action="store_true")
    parser.add_argument("--pause-after", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="offer Quick-LPC rings")
    parser.add_argument("--server-uid", type=int, default=None)
    args = parser.parse_args()
    become(args)
    if args.role == "server":
        Server(args).run()
    elif args.role == "client":
        client(args)
    else:
        hog(args)


if __name__ == "__main__":
    main()

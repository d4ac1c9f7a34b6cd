"""Peers for tests/test_fd_limits.py: a server whose fd table runs full.

``python tests/fd_limit_peers.py server NAME RUNTIME_DIR`` serves NAME (pipes taken, up to 4
per message) and prints ``READY``, ``ACCEPTED PID`` per client and ``NOTICE TYPE REASON``
(spaces as ``_``) per notice. Datagrams ``hold`` are kept unread (their fds stay open);
requests ``release`` drop the held ones, ``pipes:N`` are answered with N pipe read ends,
any other request with its bytes upper-cased (and ``fds=K`` for the fds it carried).
Commands on stdin: ``limit N`` lowers the soft RLIMIT_NOFILE until exactly N fd numbers
are free below it, then prints ``LIMITED``.
"""

from __future__ import annotations

import os
import resource
import sys
import threading

import alpc

# dup()s of stdin that fill the fd table (see limit_free).
FILLER: list[int] = []


def say(*parts: object) -> None:
    print(*parts, flush=True)


def limit_free(free: int) -> None:
    """Lower the soft limit, then fill the fd table but for exactly ``free`` numbers."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + free, hard))
    while True:
        try:
            FILLER.append(os.dup(0))
        except OSError:
            break
    for _ in range(free):
        os.close(FILLER.pop())


def commands() -> None:
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command == "limit":
            limit_free(int(rest))
            say("LIMITED")
    os._exit(0)


def answer(message: alpc.Message, held: list[alpc.Message]) -> None:
    data = message.data
    if data == b"release":
        for kept in held:
            kept.close_handles()
        held.clear()
        message.reply(b"released")
    elif data.startswith(b"pipes:"):
        ends = [os.pipe() for _ in range(int(data[6:]))]
        try:
            message.reply(b"pipes", fds=[read_end for read_end, _ in ends])
        finally:
            for pair in ends:
                os.close(pair[0])
                os.close(pair[1])
    else:
        count = len(message.handles)
        message.close_handles()
        message.reply(data.upper() + f" fds={count}".encode())


def server(name: str, runtime_dir: str) -> None:
    config = alpc.Config.from_env(runtime_dir)
    attributes = alpc.PortAttributes(handle_kinds={"pipe"}, max_handles_per_message=4)
    held: list[alpc.Message] = []
    with alpc.create_port(name, attributes, config=config) as port:
        threading.Thread(target=commands, daemon=True).start()
        say("READY")
        while True:
            event = port.wait(timeout=60)
            if isinstance(event, alpc.ConnectionRequest):
                event.accept()
                say("ACCEPTED", event.client.pid)
            elif event.type is alpc.MessageType.DATAGRAM and event.data == b"hold":
                held.append(event)
                say("HELD", len(event.handles))
            elif event.type is alpc.MessageType.REQUEST:
                answer(event, held)
            else:
                say("NOTICE", event.type.name, (event.reason or "-").replace(" ", "_"))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2], sys.argv[3])

"""Peers for the activation tests (tests/test_activation_faults.py): an activator that sets LISTEN_* exactly as told."""

from __future__ import annotations

import os
import sys


def activate(argv: list[str]) -> None:
    """``activate FD LISTEN_PID LISTEN_FDS -- ARGS``: fd 3 = FD, the variables verbatim ("$$": our pid), exec ARGS."""
    fd, pid_text, count_text = int(argv[0]), argv[1], argv[2]
    command = argv[argv.index("--") + 1:]
    if fd != 3:
        os.dup2(fd, 3, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(3, True)
    os.environ["LISTEN_PID"] = str(os.getpid()) if pid_text == "$$" else pid_text  # exec keeps the pid
    os.environ["LISTEN_FDS"] = count_text
    os.execv(command[0], command)


if __name__ == "__main__":
    if sys.argv[1] == "activate":
        activate(sys.argv[2:])
    raise SystemExit(f"unknown role {sys.argv[1]!r}")

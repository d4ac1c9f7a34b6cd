"""Running under a service manager: socket activation and readiness notification.

Follows systemd's protocols (sd_listen_fds(3), sd_notify(3)) without needing
systemd: any activator that sets ``LISTEN_FDS``/``LISTEN_PID`` and passes fds
from 3 up, or listens on ``NOTIFY_SOCKET``, works.
"""

from __future__ import annotations

import logging
import os

from .errors import ActivationError
from .transport import notify_service_manager

__all__ = ["LISTEN_FDS_START", "ServiceNotifier", "activation_fds", "activation_listen_fd"]

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _claimed_count(environ: dict[str, str] | None, pid: int | None) -> int:
    """How many fds the activator passed to this process (0: not activated, or meant for another).

    The variables are removed from the environment either way, so a child
    process never mistakes them for its own (as sd_listen_fds(3) does).
    """
    env = os.environ if environ is None else environ
    pid_text = env.get("LISTEN_PID", "")
    count_text = env.get("LISTEN_FDS", "")
    for name in _ACTIVATION_VARS:
        env.pop(name, None)
    if not pid_text or not count_text:
        return 0
    # As sd_listen_fds(3): a LISTEN_PID that is not a pid is an error, not "another process's"
    # (ignoring it would leave the activator's socket unserved). ASCII digits only:
    # str.isdigit() also passes "²", which int() then refuses with a ValueError.
    if not _is_number(pid_text):
        raise ActivationError(f"LISTEN_PID={pid_text!r} is not a pid")
    if int(pid_text) != (os.getpid() if pid is None else pid):
        return 0  # meant for another process (our parent, say)
    if not _is_number(count_text):
        raise ActivationError(f"LISTEN_FDS={count_text!r} is not a count")
    return int(count_text)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _claim(fds: list[int]) -> list[int]:
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(f"{len(fds)} fds were passed, but fd {fd} is not open ({exc.strerror})") from None
    return fds


def activation_fds(environ: dict[str, str] | None = None, pid: int | None = None) -> list[int]:
    """The fds a socket activator passed to this process (from 3 up), made close-on-exec."""
    count = _claimed_count(environ, pid)
    return _claim(list(range(LISTEN_FDS_START, LISTEN_FDS_START + count)))


def activation_listen_fd(environ: dict[str, str] | None = None, pid: int | None = None) -> int | None:
    """The one listening socket the broker was activated with, or None when not activated."""
    count = _claimed_count(environ, pid)
    if count == 0:
        return None
    if count != 1:
        raise ActivationError(f"the broker serves one socket, but {count} were passed (LISTEN_FDS={count})")
    fd = _claim([LISTEN_FDS_START])[0]
    log.info("socket-activated on fd %d", fd)
    return fd


class ServiceNotifier:
    """Tells a service manager about the daemon's state, when one asked (``NOTIFY_SOCKET``).

    Sends never wait (see ``notify_service_manager``): a notice the manager's full
    queue refused is sent again with the next ``status`` call (the broker's tick),
    READY=1 included, so the manager still learns the daemon is up.
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self.enabled = bool(self._environ.get("NOTIFY_SOCKET"))
        self._last_status = ""
        self._ready_pending = False
        # Warn once per run of refused notices, not at every tick while the queue stays full.
        self._failing = False

    def _send(self, state: str) -> bool:
        if not self.enabled:
            return False
        sent = notify_service_manager(state, self._environ)
        if not sent and not self._failing:
            log.warning("could not notify the service manager (sent again later): %s", state.replace("\n", " "))
        self._failing = not sent
        return sent

    def ready(self, status: str) -> bool:
        self._last_status = status
        sent = self._send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")
        self._ready_pending = self.enabled and not sent
        return sent

    def status(self, status: str) -> bool:
        """Update the one-line status ``systemctl status`` shows; repeats are not sent."""
        if self._ready_pending:
            return self.ready(status)
        if status == self._last_status:
            return False
        sent = self._send(f"STATUS={status}")
        if sent:
            self._last_status = status  # else: tried again at the next call
        return sent

    def stopping(self, status: str = "stopping") -> bool:
        self._last_status = status
        return self._send(f"STOPPING=1\nSTATUS={status}")

"""Logging set-up: structured fields, journald-friendly output, and flood control.

Every module logs through ``logging.getLogger(__name__)`` and passes the facts
a reader filters on (port, peer pid, uid) as ``extra=fields(...)``; the
formatter appends them as ``key=value``. Under systemd (``JOURNAL_STREAM``
names our stderr) lines carry ``<N>`` priority prefixes and no timestamps,
because journald adds its own.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TextIO

__all__ = [
    "FIELDS",
    "LogLimiter",
    "StructuredFormatter",
    "configure",
    "fields",
    "journald_priority",
    "stderr_is_journal",
]

# A limited line quotes what a peer sent (a name, a decoder's complaint): never more than this of it.
MAX_LIMITED_MESSAGE = 1024

# A field's value is cut to this (a valid port name has at most 128 characters).
MAX_FIELD = 256

FIELDS = ("port", "peer_pid", "peer_uid", "peer_gid")
# syslog(3) priorities, which journald reads from a "<N>" line prefix.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def fields(port: str | None = None, pid: int | None = None, uid: int | None = None,
           gid: int | None = None) -> dict[str, Any]:
    """The ``extra=`` mapping for a log call: only the facts that are known."""
    found = {"port": port, "peer_pid": pid, "peer_uid": uid, "peer_gid": gid}
    return {key: value for key, value in found.items() if value is not None}


def journald_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


def _field_text(value: object) -> str:
    """A field as one bounded token: a peer chooses the ``port=`` of a refused request, and a
    newline or a terminal escape in it must neither forge a line nor reach a terminal."""
    text = str(value)
    if len(text) > MAX_FIELD:
        text = f"{text[:MAX_FIELD]}...({len(text) - MAX_FIELD} characters cut)"
    if text.isprintable() and " " not in text:
        return text
    return repr(text)


class StructuredFormatter(logging.Formatter):
    """``message key=value ...``; with ``journald`` a ``<N>`` prefix on every line and no time."""

    def __init__(self, journald: bool = False) -> None:
        fmt = "%(name)s: %(message)s" if journald else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        facts = " ".join(f"{key}={_field_text(getattr(record, key))}" for key in FIELDS if hasattr(record, key))
        if facts:
            first, sep, rest = text.partition("\n")
            text = f"{first} {facts}{sep}{rest}"
        if self.journald:
            prefix = f"<{journald_priority(record.levelno)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        return text


def stderr_is_journal(environ: dict[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when systemd connected our stderr to journald (``JOURNAL_STREAM=dev:inode`` matches)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    stream = stream or sys.stderr
    if stream is None:
        return False  # started with fd 2 closed (``2>&-``): Python's sys.stderr is None
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return info.st_dev == int(dev) and info.st_ino == int(ino)


def configure(level: str | int = "INFO", stream: TextIO | None = None, journald: bool | None = None) -> None:
    """Send every alpc logger's records to ``stream`` (stderr) in the structured format."""
    stream = stream or sys.stderr
    if journald is None:
        journald = stderr_is_journal(stream=stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(StructuredFormatter(journald=journald))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class LogLimiter:
    """Log each kind of event once per key (a peer), then at most once per ``interval``.

    Repeats in between are counted and the count is reported with the next line
    for that key (or by ``flush``). A global budget of ``burst`` lines, refilled
    at ``rate`` per second, stops a flood spread over many keys (many pids).
    Thread-safe; used only on error paths, never per message.
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0, burst: int = 50, rate: float = 5.0,
                 max_keys: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._burst = burst
        self._rate = rate
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[Hashable, list[Any]] = OrderedDict()  # key -> [last, suppressed, level, text, extra]
        self._tokens = float(burst)
        self._refilled = clock()
        self.suppressed_total = 0

    def log(self, level: int, key: Hashable, message: str, *, extra: dict[str, Any] | None = None) -> bool:
        """Log ``message`` unless ``key`` logged within the interval; True if it was written."""
        if len(message) > MAX_LIMITED_MESSAGE:
            message = f"{message[:MAX_LIMITED_MESSAGE]}... ({len(message) - MAX_LIMITED_MESSAGE} characters cut)"
        with self._lock:
            now = self._clock()
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self._interval:
                entry[1] += 1
                self.suppressed_total += 1
                return False
            if not self._take_token(now):
                self.suppressed_total += 1
                if entry is not None:
                    entry[1] += 1
                return False
            suppressed = entry[1] if entry is not None else 0
            self._seen[key] = [now, 0, level, message, extra]
            self._seen.move_to_end(key)
            while len(self._seen) > self._max_keys:
                self._seen.popitem(last=False)
        if suppressed:
            message += f" ({suppressed} similar suppressed)"
        self._logger.log(level, message, extra=extra)
        return True

    def _take_token(self, now: float) -> bool:
        self._tokens = min(float(self._burst), self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def flush(self) -> None:
        """Report the counts of suppressed repeats whose interval is over, and forget those keys."""
        due: list[tuple[int, str, int, dict[str, Any] | None]] = []
        with self._lock:
            now = self._clock()
            for key, (last, suppressed, level, text, extra) in list(self._seen.items()):
                if now - last >= self._interval:
                    del self._seen[key]
                    if suppressed:
                        due.append((level, text, suppressed, extra))
        for level, text, suppressed, extra in due:
            self._logger.log(level, "%s (repeated %d more times)", text, suppressed, extra=extra)

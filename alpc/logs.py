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
import select
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any, TextIO

__all__ = [
    "FIELDS",
    "LogLimiter",
    "LogWriter",
    "StructuredFormatter",
    "configure",
    "fields",
    "flush_handlers",
    "journald_priority",
    "stderr_is_journal",
]

# A limited line quotes what a peer sent (a name, a decoder's complaint): never more than this of it.
MAX_LIMITED_MESSAGE = 1024

# A field's value is cut to this (a valid port name has at most 128 characters).
MAX_FIELD = 256

# Lines formatted but not yet written (stderr not read meanwhile): past this, new ones are dropped, counted.
MAX_QUEUED_LINES = 1024
# How long the lines still queued may hold up an exit (or an error message after them).
FLUSH_TIMEOUT = 2.0

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
    """Send every alpc logger's records to ``stream`` (stderr) in the structured format.

    Our stderr itself is written by a ``LogWriter``: a caller never waits for whoever reads it.
    """
    stream = stream or sys.stderr
    if journald is None:
        journald = stderr_is_journal(stream=stream)
    handler: logging.Handler
    fd = _fileno(stream) if stream is sys.stderr else None
    handler = LogWriter(fd) if fd is not None else logging.StreamHandler(stream)
    handler.setFormatter(StructuredFormatter(journald=journald))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)


def flush_handlers(timeout: float = FLUSH_TIMEOUT) -> None:
    """Let the lines logged so far out (for at most ``timeout`` each), before a message that follows them."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogWriter):
            handler.flush(timeout)
        else:
            handler.flush()


def _fileno(stream: TextIO | None) -> int | None:
    try:
        return stream.fileno() if stream is not None else None
    except (OSError, ValueError):  # a stream without an fd (StringIO), or one closed
        return None


class LogWriter(logging.Handler):
    """Formats a record in the caller's thread and writes it to ``fd`` from a thread of its own.

    A stderr kept open but not read (a stuck supervisor, a terminal on hold, a journald that
    lags) fills, and write(2) then blocks: the broker's single loop would serve nobody again,
    and any local user can make it log. Lines wait here instead (at most ``max_lines``); those
    that find no room are counted, and the count is written as soon as the fd takes lines again.
    The fd stays as it is (O_NONBLOCK would change it for every process sharing it), and is
    written with os.write: a thread blocked inside ``sys.stderr`` would hold its lock at exit.
    """

    def __init__(self, fd: int, max_lines: int = MAX_QUEUED_LINES) -> None:
        super().__init__()
        self._fd = fd
        self._max_lines = max_lines
        self.dropped_total = 0
        self._start()
        os.register_at_fork(after_in_child=_restart_in_child(weakref.ref(self)))

    def _start(self) -> None:
        """A fresh queue and writer thread (a forked child has no copy of the parent's thread)."""
        self._changed = threading.Condition(threading.Lock())
        self._lines: deque[bytes] = deque()
        self._dropped = 0
        self._writing = False
        self._closed = False
        threading.Thread(target=self._write_lines, args=(self._changed,), name="alpc-log-writer",
                         daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(errors="backslashreplace")
        except Exception:
            self.handleError(record)
            return
        with self._changed:
            if len(self._lines) >= self._max_lines:
                self._dropped += 1
                self.dropped_total += 1
                return
            self._lines.append(line)
            self._changed.notify_all()

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Wait (at most ``timeout``) until every line queued so far is written."""
        with self._changed:
            self._changed.wait_for(lambda: not self._lines and not self._writing, timeout)

    def close(self) -> None:
        """Write what is queued (at most FLUSH_TIMEOUT), then end the writer thread."""
        self.flush()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        super().close()

    def _write_lines(self, changed: threading.Condition) -> None:
        while changed is self._changed:
            with changed:
                changed.wait_for(lambda: bool(self._lines) or self._closed)
                if self._closed and not self._lines:
                    return
                lines, dropped = list(self._lines), self._dropped
                self._lines.clear()
                self._dropped = 0
                self._writing = True
            if dropped:
                lines.append(self._dropped_line(dropped))
            self._write(b"".join(lines))
            with changed:
                self._writing = False
                changed.notify_all()

    def _dropped_line(self, count: int) -> bytes:
        record = logging.makeLogRecord({"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                                        "msg": "%d log lines dropped: nobody read them in time",
                                        "args": (count,)})
        try:
            return (self.format(record) + "\n").encode(errors="backslashreplace")
        except Exception:
            return f"{count} log lines dropped: nobody read them in time\n".encode()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:  # another process made the fd non-blocking: wait here, not in the caller
                poller = select.poll()
                poller.register(self._fd, select.POLLOUT)
                poller.poll()
            except OSError:
                return  # nobody will ever read them (EPIPE, a closed fd): nothing to wait for


def _restart_in_child(ref: weakref.ReferenceType[LogWriter]) -> Callable[[], None]:
    def restart() -> None:
        writer = ref()
        if writer is not None:
            writer._start()
    return restart


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

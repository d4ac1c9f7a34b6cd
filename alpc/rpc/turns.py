"""Which worker thread waits on the port: a leader, a watcher, and followers (no I/O here).

The leader waits for the next event and runs it itself, so a call is served
on the thread that received it and the latency path has no hand-off between
threads. Handing the wait to another thread on every event (classic
leader/followers) costs a thread wake-up and two GIL hand-offs per call, more
than the RPC layer itself; so the hand-off only happens when it is needed:
a watcher thread takes over the wait once the leader has been running one
call for ``takeover_after`` seconds (a call that blocks does not stall the
port). ``takeover_after=0`` hands off on every event.

The watcher polls with timed waits only while events are flowing: after
``idle_after`` seconds without an event it sleeps until the leader's next
event arms it again, so an idle server has no periodic wake-ups here. Each
look costs a wake-up and a GIL hand-off. Measured with client and server
pinned to one CPU (a ~60 us raw round trip, on a shared 2-core VM): looking
every 2 ms added ~10 us per call; every 5 ms or more stayed within the
run-to-run noise (+-5 us) of one worker with no watcher. 5 ms is the
default: a blocked call holds up the others for at most ~10 ms.
"""

from __future__ import annotations

import threading
import time

__all__ = ["Turns"]

# Longer than any takeover period anyone means, and within what threading's waits take.
_MAX_WAIT = 3600.0


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Turns:
    """Turn-taking among the worker threads of one server. Thread-safe."""

    def __init__(self, *, takeover_after: float = 0.005, idle_after: float = 1.0) -> None:
        # `not (... <= ...)`: NaN passed `< 0` and made the watcher spin; inf (beyond what a
        # Condition wait takes) raised OverflowError in the watcher thread, which died.
        if not (_number(takeover_after) and 0 <= takeover_after <= _MAX_WAIT) \
                or not (_number(idle_after) and 0 < idle_after <= _MAX_WAIT):
            raise ValueError(f"takeover_after must be in [0, {_MAX_WAIT}] and idle_after in (0, {_MAX_WAIT}] "
                             f"seconds, got {takeover_after!r} and {idle_after!r}")
        self._takeover_after = takeover_after
        self._idle_after = idle_after
        # busy()/done() run twice per call: they take the lock itself, not a Condition's.
        self._lock = threading.Lock()
        self._watch = threading.Condition(self._lock)
        self._follow = threading.Condition(self._lock)
        self._leader: int | None = None
        self._watcher: int | None = None
        self._armed = False
        self._busy_since: float | None = None
        self._last_event = 0.0
        self.stopping = False

    def lead(self) -> bool:
        """Block until the calling thread is the leader; False once the server stops."""
        me = threading.get_ident()
        with self._follow:
            while True:
                if self.stopping:
                    return False
                if self._leader is None:
                    self._leader = me
                    return True
                if self._watcher is None:
                    self._watcher = me
                    if self._keep_watch(me):
                        return True
                    continue
                self._follow.wait()

    def _keep_watch(self, me: int) -> bool:
        """Watch the leader (lock held); True when this thread took over, False when it stops."""
        try:
            while not self.stopping:
                if self._leader is None or self._stuck():
                    self._leader = me
                    self._busy_since = None
                    return True
                self._watch.wait(self._next_look())
            return False
        finally:
            self._watcher = None
            self._follow.notify()  # someone else watches now

    def _stuck(self) -> bool:
        busy = self._busy_since
        return busy is not None and time.monotonic() - busy >= self._takeover_after

    def _next_look(self) -> float | None:
        now = time.monotonic()
        if self._busy_since is not None:  # look again when the leader's call would count as stuck
            return max(0.0, self._busy_since + self._takeover_after - now)
        if not self._armed or self._takeover_after == 0:
            return None  # the leader's next event wakes us
        if now - self._last_event >= self._idle_after:
            self._armed = False  # quiet: sleep until the next event arms the watch again
            return None
        # Armed, the leader is not notifying us per event: look again a takeover period from now.
        return self._takeover_after

    def busy(self) -> None:
        """The leader is about to run an event itself."""
        with self._lock:
            self._busy_since = self._last_event = time.monotonic()
            if self._watcher is not None and (not self._armed or self._takeover_after == 0):
                self._armed = True
                self._watch.notify()

    def done(self) -> bool:
        """The leader's event is handled; True if this thread still leads (nobody took over)."""
        with self._lock:
            if self._leader == threading.get_ident():
                self._busy_since = None
                return True
            return False

    def resign(self) -> None:
        """The leader stops leading (the server stops or its port is gone)."""
        with self._watch:
            if self._leader == threading.get_ident():
                self._leader = None
                self._busy_since = None
                self._watch.notify()
                self._follow.notify()

    def stop(self) -> None:
        with self._watch:
            self.stopping = True
            self._watch.notify_all()
            self._follow.notify_all()

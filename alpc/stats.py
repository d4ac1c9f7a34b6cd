"""Traffic counters kept by a server's runtime, and the reports built from them.

The hot path only does plain integer increments on a ``ConnectionStats``
(no lock per message: the reader thread of a port is single at any time, and
a lost increment from two threads replying at once is an accepted error of
a counter, never of the data). A ``PortStatistics`` folds the counters of
finished connections in and builds the ``PortStatus`` the port reports to
the broker for ``alpc peers`` and ``alpc stats``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import control
from .security import PeerCred

if TYPE_CHECKING:
    from .section import ConnectionSections

__all__ = ["ConnectionStats", "LiveConnection", "PortStatistics", "latency_bucket", "section_bytes_in_use"]

_monotonic = time.monotonic
# How many in-flight request ages a report names per client (oldest first).
MAX_AGES = 8
_LAST_BUCKET = control.LATENCY_BUCKETS - 1


def latency_bucket(seconds: float) -> int:
    """Bucket i holds latencies under 2**i microseconds (and at least half that)."""
    return min(max(int(seconds * 1e6), 0).bit_length(), _LAST_BUCKET)


class ConnectionStats:
    """Counters of one communication port, bumped by its driver."""

    __slots__ = ("bytes_in", "bytes_out", "connected_at", "errors", "in_flight", "latency",
                 "messages_in", "messages_out")

    def __init__(self) -> None:
        self.connected_at = time.monotonic()
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors = 0
        # Requests from the peer still awaiting our reply: id -> when it arrived.
        self.in_flight: dict[int, float] = {}
        self.latency = [0] * control.LATENCY_BUCKETS

    def sent(self, n_bytes: int) -> None:
        self.messages_out += 1
        self.bytes_out += n_bytes

    def replied(self, request_id: int, n_bytes: int) -> None:
        self.messages_out += 1
        self.bytes_out += n_bytes
        started = self.in_flight.pop(request_id, None)
        if started is not None:
            # (latency_bucket inline: once per reply.)
            self.latency[min(max(int((_monotonic() - started) * 1e6), 0).bit_length(), _LAST_BUCKET)] += 1


@dataclass(frozen=True)
class LiveConnection:
    """What a report needs of one open communication port.

    ``section_bytes`` is read from the connection's section ledgers when the
    report is built (``section_bytes_in_use``), so the message path counts nothing for it.
    """

    peer: PeerCred
    stats: ConnectionStats
    queue_depth: int
    section_bytes: int = 0


def section_bytes_in_use(sections: ConnectionSections | None) -> int:
    """Shared-memory section space one connection ties up right now, both ways.

    Ranges of our sections the peer has not released yet (or that we reserved
    to write a message or view in), plus ranges of the peer's sections we
    still hold (a message or view not yet released here). Whole sections
    mapped but idle are not counted: they are pooled space, not data in flight.
    """
    if sections is None:
        return 0
    return sections.pool.ledger.lent_bytes() + sections.peer.ledger.held_bytes()


_SUMMED = ("messages_in", "messages_out", "bytes_in", "bytes_out", "errors")


class PortStatistics:
    """A connection port's totals: finished connections folded in, live ones added at report time."""

    def __init__(self) -> None:
        self.connects_accepted = 0
        self.connects_rejected = 0
        self.quota_refusals = 0
        self.disconnects = 0
        self._retired = dict.fromkeys(_SUMMED, 0)
        self._retired_latency = [0] * control.LATENCY_BUCKETS

    def retire(self, stats: ConnectionStats) -> None:
        """Keep a finished connection's figures in the port's totals."""
        self.disconnects += 1
        for name in _SUMMED:
            self._retired[name] += getattr(stats, name)
        for bucket, count in enumerate(stats.latency):
            self._retired_latency[bucket] += count

    def counters(self, live: Sequence[LiveConnection]) -> control.PortCounters:
        totals = dict(self._retired)
        latency = list(self._retired_latency)
        for connection in live:
            for name in _SUMMED:
                totals[name] += getattr(connection.stats, name)
            for bucket, count in enumerate(list(connection.stats.latency)):
                latency[bucket] += count
        return control.PortCounters(
            connects_accepted=self.connects_accepted, connects_rejected=self.connects_rejected,
            quota_refusals=self.quota_refusals, disconnects=self.disconnects, latency_us=tuple(latency), **totals,
        )

    def report(self, live: Sequence[LiveConnection]) -> control.PortStatus:
        now = time.monotonic()
        peers = tuple(_peer_report(connection, now) for connection in live[:control.MAX_REPORTED_PEERS])
        return control.PortStatus(peers=peers, peers_total=len(live), counters=self.counters(live))


def _peer_report(connection: LiveConnection, now: float) -> control.PeerReport:
    stats = connection.stats
    # dict.copy() is atomic under the GIL, so a replying thread cannot break the iteration.
    started = sorted(stats.in_flight.copy().values())
    return control.PeerReport(
        pid=connection.peer.pid, uid=connection.peer.uid, gid=connection.peer.gid,
        connected_ms=_ms(now - stats.connected_at), queue_depth=connection.queue_depth,
        in_flight=len(started), in_flight_ages_ms=tuple(_ms(now - t) for t in started[:MAX_AGES]),
        messages_in=stats.messages_in, messages_out=stats.messages_out,
        bytes_in=stats.bytes_in, bytes_out=stats.bytes_out, errors=stats.errors,
        section_bytes=connection.section_bytes,
    )


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))

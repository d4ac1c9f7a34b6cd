"""The port's keeper: when membership changes wake it, and that no change goes unreported.

Sans-broker: a Registration whose link is one end of a socketpair, driven by
hand (the keeper thread is not started), so each step is deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from alpc import control
from alpc.config import Config, PortAttributes
from alpc.registration import Registration
from alpc.transport import Stream
from alpc.wire import FrameDecoder, FrameLimits, MessageType

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Registration, Stream]]:
    """A Registration that believes it is registered, and the broker's end of its link."""
    registration = Registration("t.keeper", PortAttributes(), Config(runtime_dir=tmp_path),
                                reregister_timeout=0, report_interval=60.0)
    ours, broker = Stream.pair()
    registration._stream, registration._live = ours, True
    yield registration, broker
    registration.close()
    broker.close()


def _pokes(registration: Registration) -> int:
    try:
        return os.eventfd_read(registration._poke)
    except BlockingIOError:
        return 0


def _reports(broker: Stream) -> list[control.PortStatus]:
    decoder = FrameDecoder(FrameLimits(allowed_types=frozenset({MessageType.PORT_STATUS}),
                                       max_data=control.MAX_CONTROL_BODY))
    reports = []
    while (chunk := broker.recv()) is not None and chunk:
        for frame in decoder.feed(chunk):
            reports.append(control.decode_body(frame.type, frame.data, control.PortStatus))
    return reports


def test_a_burst_of_changes_wakes_the_keeper_once(live: tuple[Registration, Stream]) -> None:
    registration, _ = live
    for _ in range(5):
        registration.report_soon()
    assert _pokes(registration) == 1


def test_a_change_made_while_the_report_is_taken_is_reported_next(live: tuple[Registration, Stream]) -> None:
    registration, broker = live
    calls = 0

    def snapshot() -> control.PortStatus:
        nonlocal calls
        calls += 1
        if calls == 1:
            registration.report_soon()  # a client comes while the first report is being made
        return control.PortStatus(peers_total=calls)

    registration._snapshot = snapshot
    registration.report_soon()
    assert _pokes(registration) == 1
    registration._maybe_report()
    assert [report.peers_total for report in _reports(broker)] == [1]
    # The change during the snapshot woke the keeper again and keeps the port due.
    assert _pokes(registration) == 1
    registration._last_report -= 1.0  # MIN_REPORT_GAP has passed
    registration._maybe_report()
    assert [report.peers_total for report in _reports(broker)] == [2]

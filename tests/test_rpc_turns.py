"""Turn-taking of the server's worker threads: one leader, a watcher that takes over from a stuck one."""

from __future__ import annotations

import threading
import time

import pytest

from alpc.rpc.turns import Turns


def test_a_lone_worker_leads_and_keeps_leading() -> None:
    turns = Turns()
    assert turns.lead()
    for _ in range(3):
        turns.busy()
        assert turns.done()
    turns.resign()
    assert turns.lead()


def test_quick_calls_are_not_handed_over() -> None:
    turns = Turns(takeover_after=5.0)
    assert turns.lead()
    other_led = threading.Event()
    other = threading.Thread(target=lambda: turns.lead() and other_led.set())
    other.start()
    for _ in range(100):
        turns.busy()
        assert turns.done()  # nobody took over: the same thread keeps the wait
    assert not other_led.is_set()
    turns.stop()
    other.join(5)
    assert not other_led.is_set()


@pytest.mark.parametrize("takeover_after", [0.0, 0.01])
def test_a_stuck_leader_is_replaced(takeover_after: float) -> None:
    turns = Turns(takeover_after=takeover_after)
    assert turns.lead()
    took_over = threading.Event()
    thread = threading.Thread(target=lambda: turns.lead() and took_over.set())
    thread.start()
    started = time.monotonic()
    turns.busy()  # the leader now runs a call that does not return for a while
    assert took_over.wait(5)
    assert time.monotonic() - started >= takeover_after
    assert not turns.done()  # the old leader learns it no longer leads
    thread.join(5)
    turns.stop()


def test_the_old_leader_becomes_the_next_watcher() -> None:
    turns = Turns(takeover_after=0.0)
    leaders: list[str] = []

    def worker(name: str, runs: threading.Event, release: threading.Event) -> None:
        while turns.lead():
            leaders.append(name)
            turns.busy()
            runs.set()
            release.wait(5)
            if not turns.done():
                continue
            turns.resign()
            return

    first_runs, second_runs = threading.Event(), threading.Event()
    release = threading.Event()
    first = threading.Thread(target=worker, args=("first", first_runs, release))
    first.start()
    assert first_runs.wait(5)
    second = threading.Thread(target=worker, args=("second", second_runs, release))
    second.start()
    assert second_runs.wait(5)  # took over from the busy first worker
    assert leaders == ["first", "second"]
    release.set()
    first.join(5)
    second.join(5)
    turns.stop()
    assert not first.is_alive() and not second.is_alive()


def test_stop_releases_every_waiting_thread() -> None:
    turns = Turns()
    assert turns.lead()
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(turns.lead())) for _ in range(3)]
    for thread in threads:
        thread.start()
    turns.stop()
    for thread in threads:
        thread.join(5)
    assert results == [False, False, False]


def test_an_idle_watch_disarms() -> None:
    turns = Turns(takeover_after=0.005, idle_after=0.05)
    assert turns.lead()
    watcher = threading.Thread(target=turns.lead)
    watcher.start()
    deadline = time.monotonic() + 5
    while turns._watcher is None:  # wait until the other thread has taken the watch
        assert time.monotonic() < deadline
        time.sleep(0.001)  # handshake-free: polls a state change, bounded by the deadline
    turns.busy()
    assert turns.done()
    assert turns._armed
    while turns._armed:  # no events for idle_after: the watcher stops its timed looks
        assert time.monotonic() < deadline
        time.sleep(0.005)  # handshake-free: polls a state change, bounded by the deadline
    turns.stop()
    watcher.join(5)


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        Turns(takeover_after=-1)
    with pytest.raises(ValueError):
        Turns(idle_after=0)

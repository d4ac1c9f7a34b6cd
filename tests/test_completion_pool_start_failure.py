"""A pool thread that cannot start does not end serve() nor leave the pool miscounted.

A thread that takes an event hands the wait on the port to another (``_promote``), starting one
when nobody waits. A start that failed (``RuntimeError: can't start new thread``: a pids cgroup
or RLIMIT_NPROC at its limit, for a moment) went up out of the leader's loop: it ended serve()
(or that pool thread) with the request it had taken never handled, left the count (``workers``)
up for a thread that never ran, and left that unstarted thread among those serve() joins as it
returns, whose join raised in turn. The start is made to fail once for a pool thread, and
then for the watcher too (which reads the port instead while the pool cannot grow, as at
max_workers): that start failing must not end serve() either.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

import alpc
from alpc.completion import CompletionPort

pytestmark = pytest.mark.timeout(60)


def _echo(message: alpc.Message) -> bytes:
    return b"echo " + bytes(message.data)


@pytest.mark.parametrize("failing", [["alpc-completion"], ["alpc-completion", "alpc-completion-watch"]])
def test_a_pool_thread_that_failed_to_start_leaves_serve_running_and_the_count_right(
        broker: alpc.Broker, config: alpc.Config, monkeypatch: pytest.MonkeyPatch, failing: list[str]) -> None:
    start = threading.Thread.start
    failures = list(failing)

    def flaky_start(self: threading.Thread, *args: Any, **kwargs: Any) -> None:
        if failures and self.name == failures[0]:
            failures.pop(0)
            raise RuntimeError("can't start new thread")
        start(self, *args, **kwargs)

    monkeypatch.setattr(threading.Thread, "start", flaky_start)
    name = "zz.cport.pool-start"
    outcome: list[BaseException | None] = []
    with alpc.create_port(name, config=config) as port:
        serving = CompletionPort(port, _echo, max_workers=2)

        def serve() -> None:
            try:
                serving.serve()
                outcome.append(None)
            except BaseException as exc:  # what serve() raised, for the test thread to see
                outcome.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with alpc.connect(name, config=config, timeout=10) as client:
                # The thread that took it could not hand the wait on: it handles it all the same.
                assert bytes(client.request(b"first", timeout=10).data) == b"echo first"
                assert not failures
                for index in range(3):
                    assert bytes(client.request(b"%d" % index, timeout=10).data) == b"echo %d" % index
        finally:
            serving.stop()
            thread.join(10)
    assert outcome == [None]
    assert serving.workers == 0

"""CompletionPort.stop() whose shutdown gives up joining the private loop's thread.

An async handler that blocks its loop (a plain blocking call inside ``async def``) outlives
serve()'s bounded join: serve() returns with the loop still running, and _Writers.shutdown()
has let the reply writers go (their count zeroed, one stop-sentinel each). When the handler
returns, its reply is handed to the writers: submit() saw no thread counted and started a new
one, which wrote the reply and then waited on the job queue for ever (no sentinel was left
for it): one reply-writer thread leaked per such stop(), for the life of the process. And the
loop, once its thread ended, was never closed (serve() closes it only if it stopped in time):
its epoll fd and self-pipe stayed open (the leak check sees them).

Deterministic by pausing a real code path: the handler waits on an event the test sets once
serve() has returned; _JOIN_TIMEOUT is shortened so that return comes sooner.
"""

from __future__ import annotations

import threading

import pytest
from background import Background  # tests/ is on sys.path

import alpc
from alpc import completion

pytestmark = pytest.mark.timeout(60)

WRITER = "alpc-completion-reply"


def _writers() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == WRITER}


def test_a_reply_after_a_stop_that_left_the_loop_running_leaks_no_writer(
        broker: alpc.Broker, config: alpc.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(completion, "_JOIN_TIMEOUT", 0.2)
    name = "completion.writer.after.stop"
    port = alpc.create_port(name, config=config)
    running, release = threading.Event(), threading.Event()
    before = _writers()

    async def handler(message: alpc.Message) -> bytes:
        running.set()
        release.wait(30)  # blocks the loop thread itself: serve()'s join of it gives up
        return b"r" * 4096  # beyond the inline threshold: not written at once, by a writer thread

    pool = alpc.CompletionPort(port, handler)

    def call() -> int:
        with alpc.connect(name, config=config, timeout=10) as client:
            return len(client.request(b"x", timeout=30).data)

    serving = Background(lambda: pool.serve(timeout=30))
    calling = Background(call)
    try:
        assert running.wait(10)
        pool.stop()
        serving.join(30)
        assert not serving.is_alive() and serving.outcomes == [None]
        left = list(pool._left_behind)
        assert left, "the loop thread was expected to outlive serve()"
        release.set()  # the handler returns now: its reply goes through the writers
        for thread in left:
            thread.join(20)
        assert not any(thread.is_alive() for thread in left)
        late = _writers() - before
        for thread in late:
            thread.join(5)  # its job is done: it has nothing left to wait for
        assert not [thread for thread in late if thread.is_alive()], "a reply writer outlived its job"
    finally:
        release.set()
        pool.stop()
        serving.join(30)
        port.close()
        calling.join(30)

"""CompletionPort.serve() after an earlier serve() ended by stop().

stop() set an Event that nothing cleared: every later serve() returned at once, silently,
and the port's clients waited for answers until their timeouts.
"""

from __future__ import annotations

import queue
import threading

import pytest
from background import Background  # tests/ is on sys.path

import alpc

pytestmark = pytest.mark.timeout(60)


def _serve_on_thread(completion: alpc.CompletionPort) -> Background[None]:
    return Background(lambda: completion.serve(timeout=30))


def _handle(message: alpc.Message) -> bytes:
    return message.data.upper()


async def _handle_async(message: alpc.Message) -> bytes:
    return message.data.upper()


@pytest.mark.parametrize("handler", [_handle, _handle_async], ids=["sync", "async"])
def test_serve_after_stop_serves_again(broker, config, handler) -> None:  # type: ignore[no-untyped-def]
    with alpc.create_port("svc.lifecycle.again", config=config) as port:
        completion = alpc.CompletionPort(port, handler, max_workers=2)
        first = _serve_on_thread(completion)
        with alpc.connect("svc.lifecycle.again", config=config, timeout=10) as comm:
            assert comm.request(b"one", timeout=10).data == b"ONE"
        completion.stop()
        first.join(15)
        assert not first.is_alive(), "the first serve() did not return after stop()"

        second = _serve_on_thread(completion)
        try:
            with alpc.connect("svc.lifecycle.again", config=config, timeout=10) as comm:
                # Before the fix: the second serve() had returned at once, nobody accepted.
                assert comm.request(b"two", timeout=10).data == b"TWO"
            assert second.is_alive(), "the second serve() returned without a stop()"
        finally:
            completion.stop()
            second.join(15)
        assert not second.is_alive(), "the second serve() did not return after stop()"
        assert first.outcomes == second.outcomes == [None]


def test_stop_before_serve_still_ends_it(broker, config) -> None:  # type: ignore[no-untyped-def]
    """What re-arming must not break: a stop() that comes before its serve() starts ends it."""
    with alpc.create_port("svc.lifecycle.early", config=config) as port:
        completion = alpc.CompletionPort(port, _handle)
        completion.stop()
        completion.serve(timeout=30)  # returns at once
        # ...and the port serves again afterwards.
        thread = _serve_on_thread(completion)
        try:
            with alpc.connect("svc.lifecycle.early", config=config, timeout=10) as comm:
                assert comm.request(b"x", timeout=10).data == b"X"
        finally:
            completion.stop()
            thread.join(15)
        assert thread.outcomes == [None]


def test_serve_again_while_a_handler_is_left_behind_is_refused(broker, config) -> None:  # type: ignore[no-untyped-def]
    """A pool thread still in its handler after stop() (serve() waits 5 s for it, then leaves it
    behind) would go back to leading the old pool if serve() ran again: refused, typed."""
    taken: queue.Queue[str] = queue.Queue()  # which thread took each request
    release = threading.Event()
    serve_thread: list[Background[None]] = []
    together = threading.Barrier(3)

    def stuck(message: alpc.Message) -> bytes:
        if message.data == b"grow":
            together.wait(10)  # three handlers at once: the pool grows to four threads
            return b"grown"
        # serve()'s own thread answers at once: it must be free to return after stop().
        if threading.current_thread() is serve_thread[0].thread:
            taken.put("serve")
            return b"serve"
        taken.put("pool")
        release.wait(30)
        return b"late"

    with alpc.create_port("svc.lifecycle.stuck", config=config) as port:
        completion = alpc.CompletionPort(port, stuck, max_workers=4)
        serve_thread.append(_serve_on_thread(completion))
        with alpc.connect("svc.lifecycle.stuck", config=config, timeout=10) as comm:
            growing = [comm.start_request(b"grow", timeout=10) for _ in range(3)]
            assert [pending.result(10).data for pending in growing] == [b"grown"] * 3
            assert completion.workers == 4
            # serve()'s thread took the connection request and spawned a pool thread: a request
            # soon goes to that one (it leads while serve()'s thread answers the others).
            for _ in range(100):
                pending = comm.start_request(b"x", timeout=10)
                if taken.get(timeout=10) == "pool":
                    break
                assert pending.result(10).data == b"serve"
            else:
                pytest.fail("no request reached the pool thread")
            completion.stop()
            serve_thread[0].join(15)  # after its 5 s wait for the stuck handler
            assert not serve_thread[0].is_alive()
            # The idle pool threads ended on stop(); only the stuck one is left (it read 3).
            assert completion.workers == 1
            try:
                with pytest.raises(RuntimeError, match="still runs"):
                    completion.serve(timeout=1)
            finally:
                release.set()  # the stuck handler returns
            assert pending.result(10).data == b"late"
            # Once that handler has returned (its thread has ended), serve() runs again.
            for thread in completion._left_behind:
                thread.join(10)
            assert completion.workers == 0
            again = _serve_on_thread(completion)
            try:
                assert comm.request(b"x", timeout=10).data in (b"serve", b"late")
            finally:
                release.set()
                completion.stop()
                again.join(15)
            assert not again.is_alive()
        assert serve_thread[0].outcomes == again.outcomes == [None]


def test_a_pool_thread_not_started_yet_stays_in_the_pool(broker, config) -> None:  # type: ignore[no-untyped-def]
    """Two handlers growing the pool at once: the second dropped the first's new thread from
    the pool's list when it had not started yet (is_alive() is False until start()), so
    stop() neither joined it nor left it behind, and serve() ran again beside its stuck
    handler (seen as test_serve_again_while_a_handler_is_left_behind_is_refused failing under
    load)."""
    with alpc.create_port("svc.lifecycle.unstarted", config=config) as port:
        completion = alpc.CompletionPort(port, _handle, max_workers=4)
        completion._stopping.set()  # the thread _promote starts ends at once
        unstarted = threading.Thread(target=lambda: None)  # another _promote's, not started yet
        completion._threads.append(unstarted)
        completion._promote()
        assert unstarted in completion._threads
        for thread in completion._threads:
            if thread.ident is not None:
                thread.join(10)

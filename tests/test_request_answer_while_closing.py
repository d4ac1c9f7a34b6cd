"""ConnectionPort.close() while another thread answers one of its connection requests.

close() lists the unanswered requests under the port's lock, then closes each outside it:
``ConnectionRequest.close`` looked at ``request._stream`` and then called ``reject``, whose
``_take_stream`` raised ``ValueError("this connection request was already answered")`` when
the application's accept() (or reject()) took the request in between. The port's close()
raised that raw ValueError half-way: the port's connections, epoll set and eventfd stayed
open, and the Quick-LPC watcher held. The take itself (a check, then a swap) was not atomic
either: two threads answering at once could both pass the check, and one went on with None.

The window is made deterministic by pausing a real code path: the closer's take of the
request (``_take_stream``), right after it saw the request unanswered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from background import Background  # tests/ is on sys.path

import alpc

pytestmark = pytest.mark.timeout(60)


@contextmanager
def pause_closer_at_take(request: alpc.ConnectionRequest, closer: Callable[[], int | None]
                         ) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The closing thread's take of ``request`` waits (``paused`` set) until the test lets it go
    on (``resume``): it has looked at the request and found it unanswered. Other threads pass."""
    paused, resume = threading.Event(), threading.Event()

    def pausing(take: Any) -> Any:
        def paused_take() -> Any:
            if threading.get_ident() == closer() and not paused.is_set():
                paused.set()
                resume.wait(20)
            return take()
        return paused_take

    # Whichever the closer calls first to take it (_take_unanswered: the fixed close()).
    for method in ("_take_stream", "_take_unanswered"):
        if hasattr(request, method):
            setattr(request, method, pausing(getattr(request, method)))
    try:
        yield paused, resume
    finally:
        resume.set()


@pytest.mark.parametrize("answer", ["accept", "reject"])
def test_port_close_while_another_thread_answers_a_request(broker: alpc.Broker, config: alpc.Config,
                                                           answer: str) -> None:
    """The port's close() raises nothing and closes everything; the answering thread gets its
    documented outcome (accept: ConnectionClosed, the port closed under it; reject: done), and
    the client hears an orderly answer."""
    name = f"close.race.request.{answer}"
    port = alpc.create_port(name, config=config)
    heard: list[object] = []

    def connect() -> None:
        try:
            client = alpc.connect(name, config=config, timeout=10)
        except BaseException as exc:  # handed to the test thread
            heard.append(exc)
            return
        try:
            heard.append(client.receive(timeout=10))
        except BaseException as exc:
            heard.append(exc)
        finally:
            client.close()

    connecting = threading.Thread(target=connect)
    connecting.start()
    closer: threading.Thread | None = None
    raised: list[BaseException] = []
    try:
        request = port.listen(timeout=10)
        closer_id: list[int] = []

        def close() -> None:
            closer_id.append(threading.get_ident())
            try:
                port.close()
            except BaseException as exc:  # handed to the test thread
                raised.append(exc)

        with pause_closer_at_take(request, lambda: closer_id[0] if closer_id else None) as (paused, resume):
            closer = threading.Thread(target=close)
            closer.start()
            assert paused.wait(10)  # close() saw the request unanswered
            if answer == "accept":
                with pytest.raises(alpc.ConnectionClosed):
                    request.accept(timeout=5)  # the port closed under it: its documented error
            else:
                request.reject("no")
            resume.set()
            closer.join(20)
            assert not closer.is_alive()
        assert raised == []
        assert port._poller.closed  # close() went all the way
        connecting.join(20)
        assert not connecting.is_alive()
        (outcome,) = heard
        if answer == "accept":
            # PORT_CLOSED (an orderly close), not a hang-up or a crash.
            assert isinstance(outcome, alpc.PeerGone) and "closed its port" in str(outcome), outcome
        else:
            assert isinstance(outcome, alpc.ConnectionRejected) and "no" in str(outcome), outcome
    finally:
        if closer is not None:
            closer.join(20)
        port.close()
        connecting.join(20)


@pytest.mark.parametrize("answer", ["accept", "reject"])
def test_answering_a_request_the_ports_close_answered_says_the_port_is_closed(broker: alpc.Broker,
                                                                              config: alpc.Config,
                                                                              answer: str) -> None:
    """A thread got a request from listen(); another closed the port (which rejected it). The
    first one's accept() or reject() raised ValueError("already answered"), as for the
    application's own second answer: the port being closed under it is ConnectionClosed, the
    error every other call on a closed port raises (and the one CompletionPort and rpc.Server
    expect from an accept: a ValueError went through them)."""
    name = f"close.race.answered.{answer}"
    port = alpc.create_port(name, config=config)
    heard: list[BaseException] = []

    def connect() -> None:
        try:
            alpc.connect(name, config=config, timeout=10).close()
        except BaseException as exc:  # handed to the test thread
            heard.append(exc)

    connecting = threading.Thread(target=connect)
    connecting.start()
    try:
        request = port.listen(timeout=10)
        port.close()
        with pytest.raises(alpc.ConnectionClosed, match="is closed"):
            if answer == "accept":
                request.accept(timeout=5)
            else:
                request.reject("no")
        connecting.join(20)
        assert not connecting.is_alive()
        (outcome,) = heard
        assert isinstance(outcome, alpc.ConnectionRejected) and "closed the port" in str(outcome), outcome
    finally:
        port.close()
        connecting.join(20)


def test_port_close_while_a_completion_port_admits_a_client(broker: alpc.Broker, config: alpc.Config) -> None:
    """port.close() while a CompletionPort's on_connect decides: its accept then raised the
    ValueError above, which _connect does not expect (it ends on ConnectionClosed), and serve()
    itself raised it instead of returning as it does for a port closed under it."""
    name = "close.race.completion"
    port = alpc.create_port(name, config=config)
    deciding, decide = threading.Event(), threading.Event()

    def on_connect(request: alpc.ConnectionRequest) -> bool:
        deciding.set()
        decide.wait(20)
        return True

    completion = alpc.CompletionPort(port, lambda message: b"", on_connect=on_connect, max_workers=1)
    serving = Background(lambda: completion.serve(timeout=30))
    connecting = Background(lambda: alpc.connect(name, config=config, timeout=10).close())
    try:
        assert deciding.wait(10)
        port.close()
        decide.set()
        serving.join(20)
        assert not serving.is_alive()
        assert serving.outcomes == [None]  # serve() returned, as for any port closed under it
        connecting.join(20)
        (outcome,) = connecting.outcomes
        assert isinstance(outcome, alpc.ConnectionRejected) and "closed the port" in str(outcome), outcome
    finally:
        decide.set()
        completion.stop()
        port.close()
        serving.join(20)
        connecting.join(20)

"""A large message's ``data`` read by two threads at once: both get the body.

A body that came through a section is copied out on first use of ``data`` (README, "Large
messages"). The first reader took the range before copying it, so a second thread reading
``data`` (or ``size``) meanwhile found neither bytes nor range: ``SectionError("the message
body is gone")`` for a body that was there, and a ``size`` of 0. The copy is held here (a
stand-in for a large copy, which runs without the GIL) by events, not sleeps.
"""

from __future__ import annotations

import os
import threading

import pytest

import alpc
from alpc import section as section_module

pytestmark = pytest.mark.timeout(60)

BODY = 1 << 20


def test_a_second_reader_of_data_during_the_first_copy_gets_the_body(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort], monkeypatch: pytest.MonkeyPatch) -> None:
    server, client = local_pair
    body = os.urandom(BODY)
    client.send(body, timeout=5)
    message = server.receive(timeout=5)
    copying, finish = threading.Event(), threading.Event()
    copy_out = section_module._native.copy_out

    def held_copy(source: memoryview) -> bytes:
        if threading.current_thread() is not threading.main_thread():
            copying.set()
            assert finish.wait(10)
        return copy_out(source)

    monkeypatch.setattr(section_module._native, "copy_out", held_copy)
    first: list[object] = []

    def read() -> None:
        try:
            first.append(message.data)
        except Exception as exc:  # reported by the assertion below
            first.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    assert copying.wait(10)
    try:
        # The first copy is still held: the body is in its range, whole.
        assert message.size == BODY, f"size {message.size} while the first reader copies"
        # A second reader waits for that copy (or, unfixed, fails at once): let it end meanwhile.
        threading.Thread(target=finish.set).start()
        second: object
        try:
            second = message.data
        except alpc.SectionError as exc:
            second = exc
    finally:
        finish.set()
        reader.join(10)
    assert first == [body]
    assert second == body, f"the second reader got {second!r:.80}"
    # The range went back once: the sender can fill its whole quota again.
    client.send(os.urandom(BODY), timeout=5)
    assert len(server.receive(timeout=5).data) == BODY

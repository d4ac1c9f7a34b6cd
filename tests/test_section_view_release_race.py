"""A received view's ``data`` read by one thread while another releases the view.

``View.tobytes`` checks ``released`` and then copies ``memory``; a release landing between the
two (another thread, or the GIL switching there) made ``data`` fail with CPython's bare
ValueError ("operation forbidden on released memoryview object"), where the runtime's word
for a body that is gone is SectionError. The window is opened by running the other thread's
release from inside the copy, not by sleeping. (Releasing a view another thread still reads
is the application's race: the README says to let go of a view only once done with it.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from local_pairs import local_connection

import alpc
from alpc import section as section_module

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def local_pair(broker: alpc.Broker, config: alpc.Config) -> Iterator[tuple[alpc.CommunicationPort,
                                                                         alpc.CommunicationPort]]:
    """(server side, client side) of one connection without Quick-LPC rings."""
    with local_connection(config, "svc.review.sections", alpc.PortAttributes(quick_lpc=False)) as (_, server, client):
        assert not client.quick
        yield server, client


def test_data_of_a_view_released_by_another_thread_mid_read_is_a_section_error(
        local_pair: tuple[alpc.CommunicationPort, alpc.CommunicationPort], monkeypatch: pytest.MonkeyPatch) -> None:
    server, client = local_pair
    body = os.urandom(300_000)
    view = client.create_view(len(body), timeout=5)
    view.memory[:] = body
    client.send(view, timeout=5)
    message = server.receive(timeout=5)
    assert message.view is not None
    copy_out = section_module._native.copy_out

    def copy_after_a_release(source: memoryview) -> bytes:
        # Another thread releases the view after tobytes() checked it, before the copy starts.
        releasing = threading.Thread(target=message.view.release)  # type: ignore[union-attr]
        releasing.start()
        releasing.join(10)
        return copy_out(source)

    monkeypatch.setattr(section_module._native, "copy_out", copy_after_a_release)
    try:
        data = message.data
    except alpc.SectionError:
        return  # the body is gone: the documented answer
    assert data == body

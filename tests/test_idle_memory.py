"""What an idle connection costs in this process's heap (both sides of each connection here).

The benchmark's memory case (benchmarks/bench_memory.py) grew from 29.9 to ~43 KiB per idle
connection over a day of features, none of which meant to cost memory: each side held five
deques (760 bytes each, empty), a Condition nobody waited on, per-connection copies of the same
frame limits, flow limits and kind sets, and a Channel one attribute past the 29 whose keys
CPython shares, so that each had a 1.5 KiB dict of its own. These tests catch the next such
creep where it happens, deterministically (allocated bytes, not timings).
"""

from __future__ import annotations

import gc
import sys
import threading
import tracemalloc
from collections import deque
from collections.abc import Iterator

import pytest

import alpc

# Bytes per connection, both sides, as tracemalloc counts them; ~17 KiB when this was written
# (~31 KiB before: see the module docstring). Raise it only for a cost a feature means to pay.
IDLE_BUDGET = 22 * 1024
WARM_CONNECTIONS = 3
MEASURED_CONNECTIONS = 16
# An instance dict at or above this holds its own keys (CPython shares the keys of up to 29
# attributes among a class's instances; past that a dict costs ~1.5 KiB, not ~300 bytes).
UNSHARED_DICT = 1024


def _connect(port: alpc.ConnectionPort, config: alpc.Config, name: str,
             ) -> tuple[alpc.CommunicationPort, alpc.CommunicationPort]:
    """One connection to ``port``, with one request answered on it (then idle, as in the benchmark)."""
    got: list[alpc.CommunicationPort] = []
    connecting = threading.Thread(target=lambda: got.append(alpc.connect(name, config=config, timeout=10)))
    connecting.start()
    try:
        server = port.listen(timeout=10).accept()
    finally:
        connecting.join(10)
    (client,) = got
    pending = client.start_request(b"x" * 64, timeout=10)
    request = server.receive(timeout=10)
    request.reply(bytes(request.data))
    del request
    assert len(pending.result(timeout=10).data) == 64
    return server, client


@pytest.fixture
def idle_connections(broker: alpc.Broker, config: alpc.Config,
                     ) -> Iterator[tuple[alpc.ConnectionPort, alpc.Config, str, list[alpc.CommunicationPort]]]:
    name = "svc.idle.memory"
    opened: list[alpc.CommunicationPort] = []
    # The socket path, in both suites: Quick-LPC rings (native only, offered at the port's
    # defaults until its first wait()) add their own ring state and mapping.
    with alpc.create_port(name, alpc.PortAttributes(quick_lpc=False), config=config) as port:
        try:
            yield port, config, name, opened
        finally:
            for comm in opened:
                comm.close()


def _alpc_objects(root: object) -> list[object]:
    """The objects of alpc's own classes that ``root`` reaches without leaving alpc's objects
    (the per-connection graph: port, core, channel, stream, decoder, sections, flow, ...)."""
    seen = {id(root)}
    found = [root]
    queue = [root]
    while queue:
        for child in gc.get_referents(queue.pop()):
            if id(child) in seen:
                continue
            seen.add(id(child))
            if type(child).__module__.startswith("alpc"):
                found.append(child)
                queue.append(child)
            elif isinstance(child, (dict, list, tuple)):
                queue.append(child)  # an instance dict or a container of alpc objects
    return found


@pytest.mark.timeout(30)
def test_no_per_connection_object_has_an_unshared_instance_dict(idle_connections) -> None:  # type: ignore[no-untyped-def]
    """An object past CPython's shared-key limit pays ~1.5 KiB for its dict on every connection
    (Channel did, from its 30th attribute on): such a class wants __slots__, or fewer attributes."""
    port, config, name, opened = idle_connections
    server, client = _connect(port, config, name)
    opened += (server, client)
    heavy = sorted({f"{type(obj).__module__}.{type(obj).__qualname__}: {sys.getsizeof(vars(obj))} bytes"
                    for side in (server, client) for obj in _alpc_objects(side)
                    if isinstance(getattr(obj, "__dict__", None), dict)
                    and sys.getsizeof(vars(obj)) >= UNSHARED_DICT})
    assert not heavy, heavy


@pytest.mark.timeout(30)
def test_an_idle_connection_holds_no_deque_nor_condition(idle_connections) -> None:  # type: ignore[no-untyped-def]
    """A deque is 760 bytes empty (its first block is allocated with it): the queues of a
    connection that are empty nearly all their life are lists. The inbox, a real FIFO up to
    the window, stays a deque. A Condition holds a deque too: a port makes its own when a
    second thread first waits on it."""
    port, config, name, opened = idle_connections
    server, client = _connect(port, config, name)
    opened += (server, client)
    inboxes = {id(server._core.inbox), id(client._core.inbox)}
    found = []
    for side in (server, client):
        for obj in _alpc_objects(side):
            holder = vars(obj) if isinstance(getattr(obj, "__dict__", None), dict) else {
                slot: getattr(obj, slot, None) for klass in type(obj).__mro__
                for slot in getattr(klass, "__slots__", ())}
            found += [f"{type(obj).__qualname__}.{attr}" for attr, value in holder.items()
                      if isinstance(value, (deque, threading.Condition)) and id(value) not in inboxes]
    assert not found, sorted(set(found))


@pytest.mark.timeout(30)
def test_an_idle_connection_stays_within_its_heap_budget(idle_connections) -> None:  # type: ignore[no-untyped-def]
    port, config, name, opened = idle_connections
    for _ in range(WARM_CONNECTIONS):  # lazily made per-process state is not per connection
        opened += _connect(port, config, name)
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(MEASURED_CONNECTIONS):
            opened += _connect(port, config, name)
        gc.collect()
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / MEASURED_CONNECTIONS
    finally:
        tracemalloc.stop()
    assert per_connection <= IDLE_BUDGET, f"{per_connection / 1024:.1f} KiB per idle connection"

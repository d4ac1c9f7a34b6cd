"""Which implementations answer which question: the one place to add one.

To measure a new alpc variant (say "alpc-view"), write its transport (a
subclass of ``transports.alpc_impl.AlpcTransport``) and add one line here:

    Impl("alpc-view", "alpc", AlpcViewTransport, cases=frozenset({"throughput"})),

Every case listed then runs it in fresh pinned process pairs beside the peers,
and the table compares it with the best peer. ``requires`` names modules that
must be importable; a missing one is reported as skipped, never dropped.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from alpc import qlpc

from . import (
    bench_connect,
    bench_memory,
    bench_oneway,
    bench_rate,
    bench_roundtrip,
    bench_scaling,
    bench_throughput,
)
from .core import Case
from .transports.alpc_impl import AlpcTransport
from .transports.alpc_quick import AlpcQuickMessageTransport, AlpcQuickTransport
from .transports.alpc_rpc import AlpcRpcTransport
from .transports.alpc_variants import (
    AlpcAioTransport,
    AlpcBatchTransport,
    AlpcCompletionTransport,
    AlpcSocketTransport,
)
from .transports.alpc_view import AlpcViewTransport
from .transports.base import Transport
from .transports.grpc_impl import GrpcTransport
from .transports.managers import ManagersTransport
from .transports.mpconn import ListenerTransport, PipeTransport
from .transports.shm import MpSharedMemoryTransport, PosixIpcTransport
from .transports.sockets import SocketPairTransport, UnixSocketTransport
from .transports.zmq_impl import ZmqTransport

__all__ = ["CASES", "IMPLEMENTATIONS", "Impl", "implementations_for", "missing_requirement"]

Kind = Literal["alpc", "peer", "ceiling"]

CASES: dict[str, Case] = {case.name: case for case in (
    bench_roundtrip.CASE,
    bench_throughput.CASE,
    bench_oneway.CASE,
    bench_connect.CASE,
    bench_rate.CASE,
    bench_scaling.CASE,
    bench_memory.CASE,
)}

_MESSAGES = frozenset({"roundtrip", "throughput", "rate"})
_CONNECTED = frozenset({"connect", "memory"})
# Issue 4's one-way transfers: alpc's two paths beside the peers it names.
_STREAM = frozenset({"oneway"})
_ALL = frozenset(CASES) - _STREAM


@dataclass(frozen=True)
class Impl:
    name: str
    kind: Kind
    transport: type[Transport] | None
    cases: frozenset[str]
    requires: tuple[str, ...] = ()
    # For the C ceiling: the mechanism argument of benchmarks/ceiling.c.
    native: str | None = None
    install_hint: str = ""
    # Why it cannot run in this process's configuration (None: it can).
    unavailable: Callable[[], str | None] | None = None


IMPLEMENTATIONS: dict[str, Impl] = {impl.name: impl for impl in (
    Impl("alpc", "alpc", AlpcTransport, _ALL | _STREAM),
    Impl("alpc-socket", "alpc", AlpcSocketTransport,
         frozenset({"roundtrip", "throughput", "rate", "connect", "scaling", "memory"}) | _STREAM),
    Impl("alpc-quick", "alpc", AlpcQuickTransport, frozenset({"roundtrip", "connect", "scaling", "memory"}),
         unavailable=qlpc.unavailable_reason),
    Impl("alpc-quick-msg", "alpc", AlpcQuickMessageTransport, frozenset({"roundtrip"}),
         unavailable=qlpc.unavailable_reason),
    Impl("alpc-view", "alpc", AlpcViewTransport, frozenset({"throughput"}) | _STREAM),
    Impl("alpc-rpc", "alpc", AlpcRpcTransport, frozenset({"roundtrip", "rate", "scaling"})),
    Impl("alpc-aio", "alpc", AlpcAioTransport, frozenset({"roundtrip", "rate"})),
    Impl("alpc-batch", "alpc", AlpcBatchTransport, frozenset({"rate"})),
    Impl("alpc-iocp", "alpc", AlpcCompletionTransport, frozenset({"scaling"})),
    Impl("socketpair", "peer", SocketPairTransport, _MESSAGES | {"scaling"} | _STREAM),
    Impl("unix-socket", "peer", UnixSocketTransport, _CONNECTED),
    Impl("mp.Pipe", "peer", PipeTransport, _MESSAGES | {"scaling"} | _STREAM),
    Impl("mp.connection", "peer", ListenerTransport, _ALL),
    Impl("mp.shared_memory", "peer", MpSharedMemoryTransport, _MESSAGES | _STREAM),
    Impl("mp.managers", "peer", ManagersTransport, frozenset({"roundtrip", "scaling"})),
    Impl("posix_ipc", "peer", PosixIpcTransport, _MESSAGES, requires=("posix_ipc",)),
    Impl("zmq", "peer", ZmqTransport, _ALL, requires=("zmq",),
         install_hint="pip install -e '.[bench]' (pyzmq)"),
    Impl("grpc", "peer", GrpcTransport, _ALL, requires=("grpc",),
         install_hint="pip install -e '.[bench]' (grpcio)"),
    Impl("c-uds", "ceiling", None, frozenset({"roundtrip", "throughput", "rate", "connect"}), native="uds"),
    Impl("c-futex", "ceiling", None, frozenset({"roundtrip", "throughput"}) | _STREAM, native="futex"),
    Impl("c-inplace", "ceiling", None, frozenset({"throughput"}) | _STREAM, native="inplace"),
    Impl("c-memcpy", "ceiling", None, frozenset({"throughput"}) | _STREAM, native="memcpy"),
)}


def implementations_for(case: str) -> list[Impl]:
    return [impl for impl in IMPLEMENTATIONS.values() if case in impl.cases]


def missing_requirement(impl: Impl) -> str | None:
    """Why ``impl`` cannot run here (a module is not installed, ALPC_PUREPYTHON=1), or None."""
    if impl.unavailable is not None:
        reason = impl.unavailable()
        if reason is not None:
            return reason
    for module in impl.requires:
        if importlib.util.find_spec(module) is None:
            hint = f"; install with {impl.install_hint}" if impl.install_hint else ""
            return f"{module} is not installed{hint}"
    return None

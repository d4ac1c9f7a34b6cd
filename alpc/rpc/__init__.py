"""RPC over alpc: declare an interface, serve it on a named port, call it through a proxy.

Arguments and results are marshalled with msgpack (never pickle); exceptions,
one-way calls, deadlines, cancellation and nested callbacks cross the
boundary. ``rpc.aio`` has the asyncio client and server. See the README
section "Embedding alpc in a service".
"""

from . import aio
from .client import Client, connect
from .codec import INLINE_THRESHOLD, Limits
from .dispatch import CallContext, current_call
from .endpoint import PendingCall, RemoteObject, start_call, with_timeout
from .hello import RPC_VERSION
from .interface import Callback, Interface, callback, method
from .server import Server

__all__ = [
    "INLINE_THRESHOLD",
    "RPC_VERSION",
    "CallContext",
    "Callback",
    "Client",
    "Interface",
    "Limits",
    "PendingCall",
    "RemoteObject",
    "Server",
    "aio",
    "callback",
    "connect",
    "current_call",
    "method",
    "start_call",
    "with_timeout",
]

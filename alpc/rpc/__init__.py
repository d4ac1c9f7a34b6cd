"""RPC over alpc: declare an interface, serve it on a named port, call it through a proxy.

Arguments and results are marshalled with msgpack (never pickle); exceptions,
one-way calls, deadlines and nested callbacks cross the boundary. See the
README section "Embedding alpc in a service".
"""

from .client import Client, connect
from .codec import INLINE_THRESHOLD, Limits
from .dispatch import CallContext, current_call
from .endpoint import RemoteObject, with_timeout
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
    "RemoteObject",
    "Server",
    "callback",
    "connect",
    "current_call",
    "method",
    "with_timeout",
]

"""The blocking RPC client: connect to a named port and call the server through a proxy."""

from __future__ import annotations

from typing import Generic, TypeVar

from .. import port as _port
from ..config import Config
from ..errors import ConnectionRejected, MarshalError, VersionMismatch
from ..security import PeerCred
from .codec import DEFAULT_LIMITS, INLINE_THRESHOLD, Limits
from .dispatch import ObjectTable
from .endpoint import Endpoint, make_proxy, with_timeout
from .hello import RPC_VERSION, Hello, decode_hello, encode_hello
from .interface import Interface, version_compatible

__all__ = ["INCOMPATIBLE", "Client", "connect"]

T = TypeVar("T", bound=Interface)

# A server's rejection reason starts with this when the client's interface
# version or RPC protocol does not fit; the client raises VersionMismatch.
INCOMPATIBLE = "incompatible"


class Client(Generic[T]):
    """A connection to an RPC server; ``proxy`` makes calls. Thread-safe; close when done."""

    def __init__(self, interface: type[T], endpoint: Endpoint, server_hello: Hello,
                 call_timeout: float | None) -> None:
        self.interface = interface
        self._endpoint = endpoint
        self.server_version = server_hello.version
        self.proxy: T = make_proxy(interface, endpoint, 0, call_timeout)

    def with_timeout(self, timeout: float | None) -> T:
        """A proxy whose calls time out after ``timeout`` seconds (the server sees the deadline)."""
        return with_timeout(self.proxy, timeout)

    @property
    def server(self) -> PeerCred:
        """The server's kernel-verified identity."""
        return self._endpoint.comm.server

    @property
    def closed(self) -> bool:
        return self._endpoint.comm.closed

    def close(self) -> None:
        self._endpoint.comm.close()

    def __enter__(self) -> Client[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<rpc.Client {self.interface.__alpc_name__} to pid {self.server.pid}>"


def connect(
    interface: type[T],
    name: str,
    *,
    timeout: float | None = None,
    call_timeout: float | None = None,
    config: Config | None = None,
    limits: Limits = DEFAULT_LIMITS,
    inline_threshold: int = INLINE_THRESHOLD,
    send_tracebacks: bool = False,
) -> Client[T]:
    """Connect to the port ``name`` serving ``interface``.

    ``timeout`` bounds the connect; ``call_timeout`` is the default per-call
    timeout (None: wait for ever). Raises VersionMismatch when the server has
    no compatible version of the interface, ConnectionRejected for other
    refusals, and whatever ``alpc.connect`` raises.
    """
    if not (isinstance(interface, type) and issubclass(interface, Interface)):
        raise TypeError(f"an RPC interface is an Interface subclass, not {interface!r}")
    hello = encode_hello(interface.__alpc_name__, interface.__alpc_version__)
    try:
        comm = _port.connect(name, hello, timeout=timeout, config=config)
    except ConnectionRejected as exc:
        if exc.reason.startswith(INCOMPATIBLE):
            raise VersionMismatch(exc.reason) from None
        raise
    try:
        server_hello = _check_server(interface, name, comm.accept_data)
    except BaseException:
        comm.close()
        raise
    endpoint = Endpoint(comm, ObjectTable(), limits=limits, inline_threshold=inline_threshold,
                        send_tracebacks=send_tracebacks, call_timeout=call_timeout)
    return Client(interface, endpoint, server_hello, call_timeout)


def _check_server(interface: type[Interface], name: str, accept_data: bytes) -> Hello:
    try:
        server = decode_hello(accept_data)
    except MarshalError as exc:
        raise VersionMismatch(f"{INCOMPATIBLE}: port {name!r} is not an alpc RPC server ({exc})") from None
    wanted = interface.__alpc_name__
    if (server.rpc != RPC_VERSION or server.interface != wanted
            or not version_compatible(interface.__alpc_version__, server.version)):
        raise VersionMismatch(
            f"{INCOMPATIBLE}: port {name!r} accepted with {server.interface} {_v(server.version)} "
            f"(RPC protocol {server.rpc}); wanted {wanted} {_v(interface.__alpc_version__)} "
            f"(RPC protocol {RPC_VERSION})"
        )
    return server


def _v(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"

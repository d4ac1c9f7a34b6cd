"""The blocking RPC client: connect to a named port and call the server through a proxy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from .. import port as _port
from ..config import Config
from ..errors import ConnectionRejected, MarshalError, VersionMismatch
from ..security import PeerCred
from .codec import DEFAULT_LIMITS, INLINE_THRESHOLD, Limits, check_options
from .dispatch import ObjectTable
from .endpoint import Endpoint, check_timeout, make_proxy, with_timeout
from .hello import RPC_VERSION, Hello, decode_hello, encode_hello
from .interface import Interface, version_compatible

__all__ = ["INCOMPATIBLE", "Client", "ClientBase", "check_server", "client_hello", "connect", "rejections"]

T = TypeVar("T", bound=Interface)

# A server's rejection reason starts with this when the client's interface
# version or RPC protocol does not fit; the client raises VersionMismatch.
INCOMPATIBLE = "incompatible"


class _Port(Protocol):
    @property
    def server(self) -> PeerCred: ...

    @property
    def closed(self) -> bool: ...


class ClientBase(Generic[T]):
    """What the blocking and the asyncio client share: the interface, the server, the state."""

    def __init__(self, interface: type[T], comm: _Port, server_hello: Hello) -> None:
        self.interface = interface
        self._comm = comm
        self.server_version = server_hello.version

    @property
    def server(self) -> PeerCred:
        """The server's kernel-verified identity."""
        return self._comm.server

    @property
    def closed(self) -> bool:
        return self._comm.closed

    def __repr__(self) -> str:
        return f"<rpc.{type(self).__name__} {self.interface.__alpc_name__} to pid {self.server.pid}>"


class Client(ClientBase[T]):
    """A connection to an RPC server; ``proxy`` makes calls. Thread-safe; close when done."""

    def __init__(self, interface: type[T], endpoint: Endpoint, server_hello: Hello,
                 call_timeout: float | None) -> None:
        super().__init__(interface, endpoint.comm, server_hello)
        self._endpoint = endpoint
        self.proxy: T = make_proxy(interface, endpoint, 0, call_timeout)

    def with_timeout(self, timeout: float | None) -> T:
        """A proxy whose calls time out after ``timeout`` seconds (the server sees the deadline)."""
        return with_timeout(self.proxy, timeout)

    def close(self) -> None:
        self._endpoint.comm.close()

    def __enter__(self) -> Client[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    # Before connecting: raised once connected, the connection was left open.
    check_options(limits, inline_threshold)
    check_timeout(call_timeout, "call_timeout")
    with rejections():
        comm = _port.connect(name, client_hello(interface), timeout=timeout, config=config)
    try:
        server_hello = check_server(interface, name, comm.accept_data)
    except BaseException:
        comm.close()
        raise
    endpoint = Endpoint(comm, ObjectTable(), limits=limits, inline_threshold=inline_threshold,
                        send_tracebacks=send_tracebacks, call_timeout=call_timeout)
    return Client(interface, endpoint, server_hello, call_timeout)


def client_hello(interface: type[Interface]) -> bytes:
    """The connect data naming ``interface`` (and checking that it is one)."""
    if not (isinstance(interface, type) and issubclass(interface, Interface)):
        raise TypeError(f"an RPC interface is an Interface subclass, not {interface!r}")
    return encode_hello(interface.__alpc_name__, interface.__alpc_version__)


@contextlib.contextmanager
def rejections() -> Iterator[None]:
    """A rejection for an incompatible version becomes VersionMismatch."""
    try:
        yield
    except ConnectionRejected as exc:
        if exc.reason.startswith(INCOMPATIBLE):
            raise VersionMismatch(exc.reason) from None
        raise


def check_server(interface: type[Interface], name: str, accept_data: bytes) -> Hello:
    """The server's hello from its accept data; VersionMismatch unless it serves ``interface``."""
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

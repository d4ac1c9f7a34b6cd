"""alpc: Windows ALPC semantics for Python programs on Linux."""

from .broker import Broker, list_ports
from .config import Config, PortAttributes
from .errors import (
    AccessDenied,
    AlpcError,
    BadArguments,
    BrokerRunning,
    BrokerUnavailable,
    ConnectionClosed,
    ConnectionRejected,
    DeadlineExceeded,
    InvalidName,
    MarshalError,
    MessageTooLarge,
    NameInUse,
    NativeBuildError,
    PeerGone,
    PortNotFound,
    ProtocolError,
    QuotaExceeded,
    RemoteError,
    RpcError,
    Timeout,
    UnknownMethod,
    VersionMismatch,
)
from .port import CommunicationPort, ConnectionPort, ConnectionRequest, connect, create_port
from .protocol import Message
from .security import PeerCred
from .wire import MessageType

__all__ = [
    "AccessDenied",
    "AlpcError",
    "BadArguments",
    "Broker",
    "BrokerRunning",
    "BrokerUnavailable",
    "CommunicationPort",
    "Config",
    "ConnectionClosed",
    "ConnectionPort",
    "ConnectionRejected",
    "ConnectionRequest",
    "DeadlineExceeded",
    "InvalidName",
    "MarshalError",
    "Message",
    "MessageTooLarge",
    "MessageType",
    "NameInUse",
    "NativeBuildError",
    "PeerCred",
    "PeerGone",
    "PortAttributes",
    "PortNotFound",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteError",
    "RpcError",
    "Timeout",
    "UnknownMethod",
    "VersionMismatch",
    "connect",
    "create_port",
    "list_ports",
]

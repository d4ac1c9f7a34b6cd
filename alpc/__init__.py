"""alpc: Windows ALPC semantics for Python programs on Linux."""

from .broker import Broker, list_ports
from .completion import CompletionPort
from .config import Config, PortAttributes
from .errors import (
    AccessDenied,
    ActivationError,
    AlpcError,
    BadArguments,
    BrokerRunning,
    BrokerUnavailable,
    Cancelled,
    ConnectionClosed,
    ConnectionRejected,
    DeadlineExceeded,
    HandleNotAllowed,
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
    SectionError,
    Throttled,
    Timeout,
    Unanswered,
    UnknownMethod,
    VersionMismatch,
)
from .grant import MemoryGrant, PeerMemory
from .handles import Handle
from .introspect import list_peers, port_stats
from .port import CommunicationPort, PendingRequest, connect
from .protocol import Message
from .quotas import BrokerLimits, Limit
from .section import RingView, Section, SectionView, View, sweep_stale_names
from .security import HandleKind, PeerCred, PortAcl
from .server import ConnectionPort, ConnectionRequest, create_port
from .wire import MessageType

__all__ = [
    "AccessDenied",
    "ActivationError",
    "AlpcError",
    "BadArguments",
    "Broker",
    "BrokerLimits",
    "BrokerRunning",
    "BrokerUnavailable",
    "Cancelled",
    "CommunicationPort",
    "CompletionPort",
    "Config",
    "ConnectionClosed",
    "ConnectionPort",
    "ConnectionRejected",
    "DeadlineExceeded",
    "ConnectionRequest",
    "Handle",
    "HandleKind",
    "HandleNotAllowed",
    "InvalidName",
    "Limit",
    "MarshalError",
    "MemoryGrant",
    "Message",
    "MessageTooLarge",
    "MessageType",
    "NameInUse",
    "NativeBuildError",
    "PeerCred",
    "PeerGone",
    "PeerMemory",
    "PendingRequest",
    "PortAcl",
    "PortAttributes",
    "PortNotFound",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteError",
    "RingView",
    "RpcError",
    "Section",
    "SectionError",
    "SectionView",
    "Throttled",
    "Timeout",
    "Unanswered",
    "UnknownMethod",
    "VersionMismatch",
    "View",
    "connect",
    "create_port",
    "list_peers",
    "list_ports",
    "port_stats",
    "sweep_stale_names",
]

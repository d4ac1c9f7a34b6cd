"""alpc: Windows ALPC semantics for Python programs on Linux."""

from .broker import Broker, list_ports
from .config import Config, PortAttributes
from .errors import (
    AccessDenied,
    ActivationError,
    AlpcError,
    BrokerRunning,
    BrokerUnavailable,
    ConnectionClosed,
    ConnectionRejected,
    HandleNotAllowed,
    InvalidName,
    MessageTooLarge,
    NameInUse,
    NativeBuildError,
    PeerGone,
    PortNotFound,
    ProtocolError,
    QuotaExceeded,
    SectionError,
    Throttled,
    Timeout,
)
from .grant import MemoryGrant, PeerMemory
from .handles import Handle
from .introspect import list_peers, port_stats
from .port import CommunicationPort, ConnectionPort, ConnectionRequest, connect, create_port
from .protocol import Message
from .quotas import BrokerLimits, Limit
from .section import Section, SectionView, View, sweep_stale_names
from .security import HandleKind, PeerCred, PortAcl
from .wire import MessageType

__all__ = [
    "AccessDenied",
    "ActivationError",
    "AlpcError",
    "Broker",
    "BrokerLimits",
    "BrokerRunning",
    "BrokerUnavailable",
    "CommunicationPort",
    "Config",
    "ConnectionClosed",
    "ConnectionPort",
    "ConnectionRejected",
    "ConnectionRequest",
    "Handle",
    "HandleKind",
    "HandleNotAllowed",
    "InvalidName",
    "Limit",
    "MemoryGrant",
    "Message",
    "MessageTooLarge",
    "MessageType",
    "NameInUse",
    "NativeBuildError",
    "PeerCred",
    "PeerGone",
    "PeerMemory",
    "PortAcl",
    "PortAttributes",
    "PortNotFound",
    "ProtocolError",
    "QuotaExceeded",
    "Section",
    "SectionError",
    "SectionView",
    "Throttled",
    "Timeout",
    "View",
    "connect",
    "create_port",
    "list_peers",
    "list_ports",
    "port_stats",
    "sweep_stale_names",
]

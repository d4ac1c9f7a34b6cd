"""What every measured implementation provides, so each question is written once.

A transport is set up in the parent of a process pair (``prepare``), then the
forked server child calls ``server()`` with a *handler* and serves until it is
killed, while the client side calls ``client()`` and drives requests. A
handler gets each received message and returns the reply, or None for a
one-way message. Every wait has a timeout (``WAIT_TIMEOUT``) so a broken peer
ends a repetition with an error instead of hanging it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

from ..core import SYNC, Job, Timing, measure

__all__ = [
    "WAIT_TIMEOUT",
    "Buffer",
    "Client",
    "Handler",
    "OneWayClient",
    "Server",
    "ServerMode",
    "Transport",
    "TransportTimeout",
]

WAIT_TIMEOUT = 60.0

Buffer = bytes | bytearray | memoryview
# Returns the reply to a request, or None for a one-way message.
Handler = Callable[[Buffer], Buffer | None]
# "single": one long-lived connection; "many": any number, coming and going.
ServerMode = Literal["single", "many"]


class TransportTimeout(TimeoutError):
    """A peer did not answer within WAIT_TIMEOUT."""


class Server(ABC):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    @abstractmethod
    def serve(self) -> None:
        """Answer messages with the handler until the process is killed."""


class Client(ABC):
    @abstractmethod
    def request(self, data: Buffer) -> Buffer:
        """Send ``data`` and return the reply (valid until the next call)."""

    @abstractmethod
    def send_batch(self, data: Buffer, count: int) -> Buffer:
        """Send ``count`` one-way messages, then a SYNC request; returns the SYNC reply."""

    @abstractmethod
    def close(self) -> None: ...

    def time_requests(self, data: Buffer, check: Callable[[Buffer], None], timing: Timing) -> list[float]:
        """``request(data)`` timed (ns each) within ``timing``'s bounds, each reply given to ``check``.

        An asyncio client overrides this to time its awaits inside its running
        loop, which is what an asyncio application sees.
        """
        return measure(lambda: check(self.request(data)), timing)


class OneWayClient(Client):
    """A client whose transport has a native one-way send."""

    @abstractmethod
    def send(self, data: Buffer) -> None: ...

    def send_batch(self, data: Buffer, count: int) -> Buffer:
        send = self.send
        for _ in range(count):
            send(data)
        return self.request(SYNC)


class Transport(ABC):
    """One implementation under test (alpc, a peer), created fresh in every process pair."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.max_message = 0

    def prepare(self, channels: int, max_message: int) -> None:
        """In the parent, before forking: make ``channels`` pre-paired channels, reserve names."""
        self.max_message = max_message

    @abstractmethod
    def server(self, mode: ServerMode, handler: Handler) -> Server:
        """In the server child: start listening; returns once clients can connect."""

    @abstractmethod
    def client(self, index: int) -> Client:
        """Connect (or take pre-paired channel ``index``)."""

    def cleanup(self) -> None:  # noqa: B027 - an optional hook; most transports hold nothing to release
        """In the parent, after the server was killed: release names and files."""

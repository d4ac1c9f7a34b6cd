"""The key-value interface shared by examples/kv_service.py (server) and examples/kv_cli.py (client).

An interface module is all a client needs: it names the interface, its
version and the callable methods; the implementation stays in the server.
"""

from __future__ import annotations

import os
from typing import Any

from alpc import rpc

PORT_NAME = "examples.kv"


class KeyValue(rpc.Interface, name="examples.kv", version=(1, 1)):
    """A small key-value store; values are bytes."""

    @rpc.method
    def get(self, key: str) -> bytes | None:
        """The value, or None if the key is missing or expired."""

    @rpc.method
    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value``; with ``ttl`` the service drops it after that many seconds."""

    @rpc.method
    def delete(self, key: str) -> bool:
        """Remove the key; False if it was not there."""

    @rpc.method
    def keys(self, prefix: str = "") -> list[str]:
        """The live keys starting with ``prefix``, sorted."""

    @rpc.method
    def stats(self) -> dict[str, Any]:
        """Counters kept by the service."""

    @rpc.method
    def dump(self, prefix: str, sink: Any) -> int:
        """Call ``sink(key, value)`` for every live key with the prefix (a callback into the caller)."""

    @rpc.method(require_uid=os.getuid())
    def clear(self) -> int:
        """Drop everything; only the uid that runs the service may."""

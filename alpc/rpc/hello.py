"""Connect and accept data of an RPC connection: protocol version, interface name and version."""

from __future__ import annotations

from typing import NamedTuple

import msgpack

from ..errors import MarshalError

__all__ = ["RPC_VERSION", "Hello", "decode_hello", "encode_hello"]

RPC_VERSION = 1


class Hello(NamedTuple):
    """What each side tells the other when connecting: protocol, interface and its version."""

    rpc: int
    interface: str
    version: tuple[int, int]


_HELLO_LIMITS = {"raw": False, "strict_map_key": True, "max_str_len": 256, "max_bin_len": 0,
                 "max_array_len": 8, "max_map_len": 16, "max_ext_len": 0}


def encode_hello(interface: str, version: tuple[int, int]) -> bytes:
    packed: bytes = msgpack.packb({"rpc": RPC_VERSION, "interface": interface, "version": list(version)})
    return packed


def decode_hello(data: bytes) -> Hello:
    """Parse connect or accept data; MarshalError if it is not an RPC hello."""
    try:
        fields = msgpack.unpackb(data, **_HELLO_LIMITS)
    except (ValueError, TypeError, OverflowError) as exc:
        raise MarshalError(f"not an RPC hello: {exc}") from None
    if not isinstance(fields, dict):
        raise MarshalError("an RPC hello is a map")
    rpc, interface, version = fields.get("rpc"), fields.get("interface"), fields.get("version")
    if type(rpc) is not int or type(interface) is not str:
        raise MarshalError("an RPC hello names the protocol version and the interface")
    if not (isinstance(version, list) and len(version) == 2 and all(type(v) is int and v >= 0 for v in version)):
        raise MarshalError("an RPC hello's interface version is [major, minor]")
    return Hello(rpc, interface, (version[0], version[1]))

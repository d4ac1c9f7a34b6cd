"""The RPC layer, third pass: options checked when given (not once connected or serving), a
hostile peer's non-finite deadline, and a method whose signature cannot be read.

Servers are real processes (tests/rpc_option_peers.py, the blocking and the asyncio one); the
clients and the hostile peers run in this process.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from rpc_option_peers import Relay, RelayImpl
from rpc_peer_main import ROLES, start_peer

import alpc
from alpc import rpc
from alpc.errors import BadArguments, MarshalError
from alpc.rpc.codec import HEAD, RPC_VERSION, Codec, Kind
from alpc.rpc.dispatch import ObjectTable
from alpc.rpc.endpoint import EndpointBase, make_proxy
from alpc.rpc.hello import encode_hello
from alpc.rpc.turns import Turns
from alpc.security import PeerCred

PEERS = Path(__file__).resolve().parent / "rpc_option_peers.py"
NAME = "svc.rpc-options"

pytestmark = pytest.mark.timeout(60)


def start(spawn: Any, runtime_dir: Path, role: str) -> Any:
    return start_peer(spawn, PEERS, role, NAME, runtime_dir)


def raw_call(method: str, args: list[Any], deadline: Any) -> bytes:
    return HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb([0, method, args, None, deadline])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- rpc.Limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_str_len", "max_bin_len", "max_array_len", "max_map_len",
                                   "max_ext_len", "max_containers", "max_segments"])
@pytest.mark.parametrize("value", [0, -1, 2**63, 1.5, "16", True, None])
def test_limits_are_checked_when_made(field: str, value: Any) -> None:
    # Nothing was checked: -1 is msgpack's "no limit" (the opposite of what was asked), 2**63
    # made every message over the smallest limit a MarshalError (msgpack's OverflowError), a
    # str or None raised TypeError only when a connection built its Codec, once connected.
    with pytest.raises(ValueError, match=f"Limits.{field}"):
        rpc.Limits(**{field: value})
    assert rpc.Limits(**{field: 1}) and rpc.Limits(**{field: sys.maxsize})


# -- a client's options: checked before it connects ---------------------------------------------------

BAD_CLIENT_OPTIONS = [
    pytest.param({"inline_threshold": -1}, ValueError, id="inline_threshold=-1"),
    pytest.param({"limits": "strict"}, TypeError, id="limits=str"),
    pytest.param({"call_timeout": math.nan}, ValueError, id="call_timeout=nan"),
    pytest.param({"call_timeout": -1}, ValueError, id="call_timeout=-1"),
]


@pytest.mark.parametrize(("options", "error"), BAD_CLIENT_OPTIONS)
def test_connect_refuses_bad_options_before_connecting(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config,
        options: dict[str, Any], error: type[Exception]) -> None:
    # A bad inline_threshold or limits raised from the Codec only once rpc.connect had its
    # connection, which it never closed (a socket and a pidfd leaked per try, and the server kept
    # the connection); a NaN or negative call_timeout was accepted and every call raised ValueError.
    server = start(spawn, runtime_dir, "server")
    fds = open_fds()
    with pytest.raises(error) as caught:
        rpc.connect(Relay, NAME, config=config, timeout=10, **options)
    assert open_fds() == fds, f"{caught.value!r} left {open_fds() - fds} fds open"
    with rpc.connect(Relay, NAME, config=config, timeout=10, call_timeout=5) as client:
        assert client.proxy.pid() == server.pid


@pytest.mark.parametrize(("options", "error"), BAD_CLIENT_OPTIONS)
def test_an_async_connect_refuses_bad_options_before_connecting(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config,
        options: dict[str, Any], error: type[Exception]) -> None:
    start(spawn, runtime_dir, "async-server")

    async def main() -> None:
        fds = open_fds()
        with pytest.raises(error) as caught:
            await rpc.aio.connect(Relay, NAME, config=config, timeout=10, **options)
        assert open_fds() == fds, f"{caught.value!r} left {open_fds() - fds} fds open"

    asyncio.run(main())


def test_with_timeout_refuses_nan() -> None:
    # `nan < 0` is False: the proxy was made, and each of its calls raised ValueError.
    me = PeerCred(os.getpid(), os.getuid(), os.getgid())
    endpoint = EndpointBase(ObjectTable(), me, limits=rpc.Limits(), inline_threshold=256,
                            send_tracebacks=False, call_timeout=None)
    proxy = make_proxy(Relay, endpoint, 0, None)
    for timeout in (math.nan, -1, "1"):
        with pytest.raises(ValueError, match="timeout"):
            rpc.with_timeout(proxy, timeout)  # type: ignore[arg-type]
    assert rpc.with_timeout(proxy, math.inf)._timeout == math.inf  # type: ignore[attr-defined]


# -- a server's options: checked when it is made ------------------------------------------------------


@pytest.mark.parametrize("options", [
    # Its workers spun on port.wait(timeout=0): a whole CPU for an idle server.
    {"poll_interval": 0},
    # port.wait() raised ValueError in every worker, which died: the server answered nobody.
    {"poll_interval": math.nan}, {"poll_interval": -1}, {"poll_interval": "0.1"},
    # The watcher spun while a call ran and never took over; inf: it died of OverflowError.
    {"takeover_after": math.nan}, {"takeover_after": math.inf},
    # start() raised TypeError after it had made the port (left registered by `with Server()`).
    {"workers": 2.5}, {"workers": True},
    # Every client was accepted and then never answered (its endpoint could not be made).
    {"inline_threshold": -1}, {"limits": None},
])
def test_a_server_refuses_bad_options_when_made(options: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        rpc.Server(NAME, RelayImpl(), **options)


@pytest.mark.parametrize("options", [
    # The accept loop ended at the first client (its endpoint could not be made): no more admissions.
    {"inline_threshold": -1}, {"limits": None},
    {"max_tasks": 2.5}, {"max_tasks": True},
])
def test_an_async_server_refuses_bad_options_when_made(options: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        rpc.aio.Server(NAME, RelayImpl(), **options)


@pytest.mark.parametrize("options", [{"takeover_after": math.nan}, {"takeover_after": math.inf},
                                     {"idle_after": math.nan}, {"idle_after": math.inf}])
def test_turns_refuse_non_finite_periods(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Turns(**options)


# -- a hostile peer's deadline ------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", [math.nan, math.inf, -math.inf])
def test_the_codec_refuses_a_non_finite_deadline(deadline: float) -> None:
    with pytest.raises(MarshalError, match="finite"):
        Codec().decode_call(raw_call("pid", [], deadline))


@pytest.mark.parametrize("deadline", [math.nan, math.inf])
@pytest.mark.parametrize("role", ROLES)
def test_a_hostile_non_finite_deadline_is_refused(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, role: str, deadline: float) -> None:
    # NaN passed every check (`now >= nan` is False): the handler ran with remaining() == 0.0 and
    # its nested calls raised a plain ValueError. inf made the handler's call into the object the
    # peer passed wait until that deadline, capped at ~25 days, instead of the port's 5 s send
    # timeout: a peer that never answers held a worker (or a task) that long.
    server = start(spawn, runtime_dir, role)
    codec = Codec()
    sink = msgpack.ExtType(6, msgpack.packb([1, "alpc.callback", {"call": False}]))
    with alpc.connect(NAME, encode_hello("options.relay", (1, 0)), config=config, timeout=10) as hostile, \
            rpc.connect(Relay, NAME, config=config, timeout=10, call_timeout=5) as bystander:
        # relay first: the hostile peer never answers the call into its sink.
        for data in (raw_call("relay", [sink, 1], deadline), raw_call("remaining", [], deadline)):
            reply = hostile.request(data, timeout=3)
            kind, error = codec.decode_reply(reply.data)
            assert kind is Kind.ERROR and error.type_name == "MarshalError", error
        assert bystander.proxy.pid() == server.pid
        # A finite one still works as before.
        reply = hostile.request(raw_call("remaining", [], time.monotonic() + 30), timeout=5)
        left = codec.result(reply.data)
        assert 0 < left <= 30


# -- a method whose signature cannot be read -----------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_arguments_a_c_function_method_does_not_take_are_bad_arguments(
        broker: alpc.Broker, spawn: Any, runtime_dir: Path, config: alpc.Config, role: str) -> None:
    # biggest is the builtin max(), whose signature inspect cannot read: the check was skipped and
    # max() raised TypeError itself, a RemoteError ("'int' object is not iterable" for one
    # argument) where the README promises BadArguments for a signature mismatch. The interface's
    # declaration, biggest(self, a, b), is the signature to check against.
    start(spawn, runtime_dir, role)
    with rpc.connect(Relay, NAME, config=config, timeout=10, call_timeout=5) as client:
        assert client.proxy.biggest(1, 2) == 2
        with pytest.raises(BadArguments):
            client.proxy.biggest(1, 2, bogus=3)  # type: ignore[call-arg]
        with pytest.raises(BadArguments):
            client.proxy.biggest(1)  # type: ignore[call-arg]
        with pytest.raises(BadArguments):
            client.proxy.biggest(1, 2, 3)  # type: ignore[call-arg]

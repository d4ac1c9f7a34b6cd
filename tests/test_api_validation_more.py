"""Bad input to the public API, second round: a typed, prompt error, never a wrong message sent.

Each test failed before its fix: a dict body sent its keys, receive_many(0) still took a message,
cancel("x") said "not in flight", a config or attributes of the wrong type failed deep inside
with AttributeError, yes/no settings took any value, a hostile server's accept data and reason
were taken at any size, and a section the system cannot back raised untyped OSError.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rpc_peers import StoreImpl

import alpc
from alpc import aio, rpc

pytestmark = pytest.mark.timeout(60)

HOSTILE = Path(__file__).resolve().parent / "api_validation_peers.py"


def _generator() -> object:
    return (part for part in [b"gen"])


# Not a body: a dict was iterated for its keys ({} sent an empty body), a generator was used
# up by the size count (an empty body went), a str failed part by part.
NOT_BODIES: list[Callable[[], object]] = [dict, lambda: {b"k": b"v"}, _generator, lambda: "text", lambda: 5]


# -- message bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", NOT_BODIES)
def test_a_body_that_is_not_buffers_is_a_type_error(broker: alpc.Broker, config: alpc.Config, spawn,
                                                    make: Callable[[], object]) -> None:
    server = spawn("server", "svc.body")
    server.expect("READY")
    with alpc.connect("svc.body", timeout=10, config=config) as comm:
        with pytest.raises(TypeError, match="message body"):
            comm.request(make(), timeout=10)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="message body"):
            comm.start_request(make(), timeout=10)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="message body"):
            comm.send(make(), timeout=10)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="message body"):
            comm.send_many([make()], timeout=10)  # type: ignore[list-item]
        comm.send(b"marker", timeout=10)
        assert server.expect("DATAGRAM") == ["marker"]  # nothing went before it
        assert comm.request([b"still", b" fine"], timeout=10).data == b"STILL FINE"


@pytest.mark.parametrize("make", NOT_BODIES)
def test_aio_a_body_that_is_not_buffers_is_a_type_error(broker: alpc.Broker, config: alpc.Config, spawn,
                                                        make: Callable[[], object]) -> None:
    server = spawn("server", "svc.abody")
    server.expect("READY")

    async def main() -> bytes:
        comm = await aio.connect("svc.abody", timeout=10, config=config)
        async with comm:
            with pytest.raises(TypeError, match="message body"):
                await comm.request(make(), timeout=10)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="message body"):
                await comm.send(make(), timeout=10)  # type: ignore[arg-type]
            await comm.send(b"marker", timeout=10)
            return (await comm.request([b"still", b" fine"], timeout=10)).data

    assert asyncio.run(main()) == b"STILL FINE"
    assert server.expect("DATAGRAM") == ["marker"]


# -- cancel and receive_many --------------------------------------------------------------------


BAD_IDS = [("x", TypeError), (1.5, TypeError), (True, TypeError), (-1, ValueError), (0, ValueError),
           (2**32, ValueError)]


def test_cancel_refuses_what_is_not_a_request_id(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.cancel")
    server.expect("READY")
    with alpc.connect("svc.cancel", timeout=10, config=config) as comm:
        for bad, error in BAD_IDS:
            with pytest.raises(error, match="request id"):
                comm.cancel(bad)  # type: ignore[arg-type]  # was False: "not in flight"
        assert comm.cancel(12345) is False  # a well-formed id not in flight is still just False

        async def main() -> bool:
            acomm = await aio.connect("svc.cancel", timeout=10, config=config)
            async with acomm:
                for bad, error in BAD_IDS:
                    with pytest.raises(error, match="request id"):
                        acomm.cancel(bad)  # type: ignore[arg-type]
                return acomm.cancel(12345)

        assert asyncio.run(main()) is False


def _two_datagrams_waiting(comm: alpc.CommunicationPort) -> None:
    # The server sends its datagram before its reply: both are in our inbox when request returns.
    assert comm.request(b"push:one", timeout=10).data == b"pushed"
    assert comm.request(b"push:two", timeout=10).data == b"pushed"


@pytest.mark.parametrize(("bad", "error"), [(0, ValueError), (-1, ValueError), ("2", TypeError),
                                            (2.0, TypeError), (None, TypeError)])
def test_receive_many_refuses_a_bad_bound_and_loses_nothing(broker: alpc.Broker, config: alpc.Config, spawn,
                                                            bad: object, error: type[Exception]) -> None:
    server = spawn("server", "svc.many")
    server.expect("READY")
    with alpc.connect("svc.many", timeout=10, config=config) as comm:
        _two_datagrams_waiting(comm)
        with pytest.raises(error, match="max_messages"):
            comm.receive_many(bad, timeout=5)  # type: ignore[arg-type]  # 0 returned one message
        assert [message.data for message in comm.receive_many(10, timeout=5)] == [b"one", b"two"]


@pytest.mark.parametrize(("bad", "error"), [(0, ValueError), (-1, ValueError), ("2", TypeError)])
def test_aio_receive_many_refuses_a_bad_bound_and_loses_nothing(broker: alpc.Broker, config: alpc.Config, spawn,
                                                                bad: object, error: type[Exception]) -> None:
    server = spawn("server", "svc.amany")
    server.expect("READY")

    async def main() -> list[bytes]:
        comm = await aio.connect("svc.amany", timeout=10, config=config)
        async with comm:
            for word in (b"one", b"two"):
                assert (await comm.request(b"push:" + word, timeout=10)).data == b"pushed"
            with pytest.raises(error, match="max_messages"):
                await comm.receive_many(bad, timeout=5)  # type: ignore[arg-type]
            return [message.data for message in await comm.receive_many(10, timeout=5)]

    assert asyncio.run(main()) == [b"one", b"two"]


# -- config and attributes of the wrong type ------------------------------------------------------


def test_a_config_or_attributes_of_the_wrong_type_is_a_type_error(broker: alpc.Broker, config: alpc.Config,
                                                                  runtime_dir: Path) -> None:
    as_text = str(runtime_dir)  # the obvious mistake: the runtime dir for the Config
    with pytest.raises(TypeError, match="config must be an alpc"):
        alpc.connect("svc.any", timeout=5, config=as_text)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be an alpc"):
        alpc.create_port("svc.any", config=as_text)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be an alpc"):
        alpc.list_ports(as_text)  # type: ignore[arg-type]
    for settings in ({"max_connections": 1}, {}):  # {} was silently taken for the defaults
        with pytest.raises(TypeError, match="attributes must be an alpc"):
            alpc.create_port("svc.any", settings, config=config)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be an alpc"):
        rpc.Server("svc.any", StoreImpl(), config=as_text)  # type: ignore[arg-type]  # was at start()
    with pytest.raises(TypeError, match="attributes must be an alpc"):
        rpc.aio.Server("svc.any", StoreImpl(), attributes={})  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(TypeError, match="config must be an alpc"):
            await aio.connect("svc.any", timeout=5, config=as_text)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="attributes must be an alpc"):
            await aio.create_port("svc.any", {}, config=config)  # type: ignore[arg-type]

    asyncio.run(main())
    assert alpc.list_ports(config) == ()  # and no port was made meanwhile


# -- yes/no settings, handle kinds and ACL sets -----------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [("secure_views", "yes"), ("quick_lpc", "no"), ("direct_memory", 1),
                                             ("allow_unsealed_sections", "x"), ("refuse_identity_change", 0)])
def test_port_attribute_flags_must_be_bools(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a bool"):
        alpc.PortAttributes(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "value"), [("quick_lpc", "no"), ("allow_unsealed_sections", "x"),
                                             ("refuse_identity_change", 1)])
def test_config_flags_must_be_bools(tmp_path: Path, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a bool"):
        alpc.Config(runtime_dir=tmp_path, **{name: value})  # type: ignore[arg-type]


def test_send_timeout_is_not_a_bool() -> None:
    with pytest.raises(ValueError, match="send_timeout"):
        alpc.PortAttributes(send_timeout=True)  # was taken for 1 second


@pytest.mark.parametrize("kinds", [None, 5, "file", [["file"]]])
def test_handle_kinds_must_be_a_set_of_kinds(tmp_path: Path, kinds: object) -> None:
    # None and 5 said only "not iterable"; "file" was taken letter by letter ("unknown kind 'f'").
    with pytest.raises(ValueError, match="handle_kinds must"):
        alpc.PortAttributes(handle_kinds=kinds)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="handle_kinds must"):
        alpc.Config(runtime_dir=tmp_path, handle_kinds=kinds)  # type: ignore[arg-type]


@pytest.mark.parametrize("ids", [None, 5, "12", [[1]]])
def test_acl_id_sets_must_be_sets_of_ids(ids: object) -> None:
    for name in ("allow_uids", "allow_gids", "deny_uids", "deny_gids"):
        with pytest.raises(ValueError, match=f"PortAcl.{name} must"):
            alpc.PortAcl(**{name: ids})  # type: ignore[arg-type]


# -- sections the system cannot back: README's QuotaExceeded ----------------------------------------


@pytest.mark.parametrize("size", [2**62, 2**64])
def test_a_section_too_large_to_back_is_quota_exceeded(size: int) -> None:
    # Was OSError ENOMEM (2**62) and OverflowError (2**64); the README says "QuotaExceeded ... no
    # section could be created".
    with pytest.raises(alpc.QuotaExceeded, match="cannot create"):
        alpc.Section.create(size)


# -- a hostile server's connection reply ------------------------------------------------------------


def _hostile(spawn, runtime_dir: Path, role: str, name: str):  # type: ignore[no-untyped-def]
    server = spawn.argv([sys.executable, str(HOSTILE), role, name, "--runtime-dir", str(runtime_dir)])
    server.expect("READY")
    return server


@pytest.mark.parametrize("driver", ["blocking", "aio"])
@pytest.mark.parametrize("role", ["big-accept", "long-reason"])
def test_the_client_bounds_a_hostile_servers_reply(broker: alpc.Broker, config: alpc.Config, runtime_dir: Path,
                                                   spawn, role: str, driver: str) -> None:
    # Only the server side bounded accept data (MAX_CONNECT_DATA) and reasons (1024 characters):
    # a client took 1 MiB of accept data (up to 16 MiB), and a 60000-character reason.
    name = f"svc.hostile-{role}"
    server = _hostile(spawn, runtime_dir, role, name)
    with pytest.raises(alpc.ProtocolError):
        if driver == "blocking":
            alpc.connect(name, timeout=10, config=config).close()
        else:
            async def main() -> None:
                comm = await aio.connect(name, timeout=10, config=config)
                await comm.close()

            asyncio.run(main())
    server.expect("ANSWERED")

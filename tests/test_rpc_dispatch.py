"""Interfaces and the dispatch core, sans-IO: call bytes in, reply bytes out."""

from __future__ import annotations

import grp
import os
import time
from typing import Any

import msgpack
import pytest

from alpc.errors import (
    AccessDenied,
    BadArguments,
    DeadlineExceeded,
    MarshalError,
    RemoteError,
    UnknownMethod,
)
from alpc.rpc import Interface, callback, current_call, method
from alpc.rpc.codec import HEAD, RPC_VERSION, Codec, Kind
from alpc.rpc.dispatch import Dispatcher, ObjectTable
from alpc.rpc.faults import error_for
from alpc.rpc.interface import Access, version_compatible
from alpc.security import PeerCred

ME = PeerCred(1234, os.getuid(), os.getgid())
STRANGER = PeerCred(99, os.getuid() + 1000, os.getgid() + 1000)


class Calc(Interface, name="test.calc", version=(1, 4)):
    @method
    def add(self, a: int, b: int = 0) -> int: ...

    @method
    def ctx(self) -> list[Any]: ...

    @method
    def boom(self, kind: str) -> None: ...

    @method(oneway=True)
    def note(self, text: str) -> None: ...

    @method
    def keywords(self, *, needed: int) -> int: ...

    @method
    def spread(self, *args: Any, **kwargs: Any) -> list[Any]: ...

    @method(require_uid=os.getuid())
    def mine(self) -> str: ...

    @method(require_group=grp.getgrgid(os.getgid()).gr_name)
    def group(self) -> str: ...

    def helper(self) -> str:
        return "not declared"


class CalcImpl(Calc):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    def ctx(self) -> list[Any]:
        call = current_call()
        return [call.caller.pid, call.interface, call.method, call.remaining(), call.oneway, call.expired]

    def boom(self, kind: str) -> None:
        if kind == "key":
            raise KeyError("missing")
        if kind == "denied":
            raise AccessDenied("handler says no")
        raise RuntimeError("kaboom")

    def note(self, text: str) -> None:
        self.notes.append(text)
        if text == "fail":
            raise ValueError("ignored: nobody waits for a one-way call")

    def keywords(self, *, needed: int) -> int:
        return needed

    def spread(self, *args: Any, **kwargs: Any) -> list[Any]:
        return [list(args), kwargs]

    def mine(self) -> str:
        return "yours"

    def group(self) -> str:
        return "members"


def make(caller: PeerCred = ME, **options: Any) -> tuple[Codec, Dispatcher, CalcImpl]:
    impl = CalcImpl()
    objects = ObjectTable(impl)
    codec = Codec(export=objects.export)
    return codec, Dispatcher(codec, objects, caller=caller, **options), impl


def outcome(codec: Codec, reply: Any) -> Any:
    kind, value = codec.decode_reply(reply)
    if kind is Kind.ERROR:
        raise error_for(*value)
    return value


def call(dispatcher: Dispatcher, codec: Codec, name: str, *args: Any, deadline: float | None = None,
         **kwargs: Any) -> Any:
    payload, _ = codec.encode_call(0, name, args, kwargs, deadline)
    return outcome(codec, dispatcher.handle(payload))


# -- declarations ------------------------------------------------------------------------


def test_only_declared_methods_are_in_the_table() -> None:
    assert set(Calc.__alpc_methods__) == {"add", "ctx", "boom", "note", "keywords", "spread", "mine", "group"}
    assert CalcImpl.__alpc_methods__ == Calc.__alpc_methods__
    assert CalcImpl.__alpc_name__ == "test.calc" and CalcImpl.__alpc_version__ == (1, 4)
    assert Calc.__alpc_methods__["note"].oneway
    assert Calc.__alpc_methods__["mine"].access == Access(frozenset({os.getuid()}), frozenset())


def test_private_names_cannot_be_declared() -> None:
    with pytest.raises(TypeError, match="may not start with '_'"):
        class Bad(Interface):
            @method
            def _secret(self) -> None: ...


@pytest.mark.parametrize("version", [(1,), (1, 2, 3), (-1, 0), ("1", "0"), (True, 0)])
def test_bad_versions(version: Any) -> None:
    with pytest.raises(ValueError, match="version"):
        class Bad(Interface, version=version):
            pass


def test_bad_names_and_access_arguments() -> None:
    with pytest.raises(ValueError, match="interface name"):
        class Bad(Interface, name="has space"):
            pass
    with pytest.raises(TypeError, match="require_uid"):
        method(require_uid="root")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no group named"):
        Access(groups=frozenset({"no-such-group-alpc"})).resolve()


def test_version_compatibility_rule() -> None:
    assert version_compatible((1, 2), (1, 2)) and version_compatible((1, 0), (1, 5))
    assert not version_compatible((1, 3), (1, 2)) and not version_compatible((2, 0), (1, 9))


def test_an_extension_inherits_and_adds() -> None:
    class More(Calc, name="test.calc", version=(1, 5)):
        @method
        def extra(self) -> None: ...

    assert set(More.__alpc_methods__) == set(Calc.__alpc_methods__) | {"extra"}
    assert Calc.__alpc_version__ == (1, 4)


# -- dispatch ------------------------------------------------------------------------------


def test_calls_run_and_results_come_back() -> None:
    codec, dispatcher, _ = make()
    assert call(dispatcher, codec, "add", 2, 3) == 5
    assert call(dispatcher, codec, "add", 2) == 2
    assert call(dispatcher, codec, "add", a=1, b=2) == 3
    assert call(dispatcher, codec, "spread", 1, 2, x=3) == [[1, 2], {"x": 3}]
    assert call(dispatcher, codec, "keywords", needed=7) == 7


def test_context_carries_identity_and_deadline() -> None:
    codec, dispatcher, _ = make()
    pid, interface, name, remaining, oneway, expired = call(dispatcher, codec, "ctx",
                                                            deadline=time.monotonic() + 30)
    assert (pid, interface, name, oneway, expired) == (ME.pid, "test.calc", "ctx", False, False)
    assert 25 < remaining <= 30
    assert call(dispatcher, codec, "ctx")[3] is None
    with pytest.raises(LookupError):
        current_call()


@pytest.mark.parametrize("name", ["helper", "__class__", "__init__", "__dict__", "_fn", "add.__globals__",
                                  "nope", ""])
def test_undeclared_attributes_are_unknown_methods(name: str) -> None:
    codec, dispatcher, _ = make()
    with pytest.raises(UnknownMethod, match="has no method"):
        call(dispatcher, codec, name)


def test_unknown_object_id() -> None:
    codec, dispatcher, _ = make()
    payload, _ = codec.encode_call(5, "add", (1,), None, None)
    with pytest.raises(UnknownMethod, match="no object 5"):
        outcome(codec, dispatcher.handle(payload))


@pytest.mark.parametrize(("args", "kwargs"), [((), {}), ((1, 2, 3), {}), ((1,), {"c": 2}), ((1,), {"a": 2})])
def test_bad_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    codec, dispatcher, _ = make()
    with pytest.raises(BadArguments, match=r"test\.calc\.add"):
        call(dispatcher, codec, "add", *args, **kwargs)
    with pytest.raises(BadArguments):
        call(dispatcher, codec, "keywords")


def test_non_string_keyword_names_are_bad_arguments() -> None:
    codec, dispatcher, _ = make()
    envelope = msgpack.packb([0, "spread", [], {b"raw": 1}, None])
    with pytest.raises(BadArguments, match="strings"):
        outcome(codec, dispatcher.handle(HEAD.pack(RPC_VERSION, Kind.CALL, 0) + envelope))


def test_handler_exceptions_are_typed_remote_errors() -> None:
    codec, dispatcher, _ = make()
    with pytest.raises(KeyError) as caught:
        call(dispatcher, codec, "boom", "key")
    error = caught.value
    assert isinstance(error, RemoteError)
    assert (error.type_name, error.remote_message, error.remote_traceback) == ("KeyError", "'missing'", None)
    with pytest.raises(RemoteError, match="RuntimeError: kaboom"):
        call(dispatcher, codec, "boom", "other")
    with pytest.raises(AccessDenied, match="handler says no"):
        call(dispatcher, codec, "boom", "denied")


def test_tracebacks_only_when_asked() -> None:
    codec, dispatcher, _ = make(send_tracebacks=True)
    with pytest.raises(RemoteError) as caught:
        call(dispatcher, codec, "boom", "other")
    assert caught.value.remote_traceback is not None
    assert "in boom" in caught.value.remote_traceback and "kaboom" in caught.value.remote_traceback


def test_access_by_uid_and_group() -> None:
    codec, dispatcher, _ = make()
    assert call(dispatcher, codec, "mine") == "yours"
    assert call(dispatcher, codec, "group") == "members"
    codec, dispatcher, _ = make(caller=STRANGER)
    with pytest.raises(AccessDenied, match=f"uid {STRANGER.uid}"):
        call(dispatcher, codec, "mine")
    with pytest.raises(AccessDenied):
        call(dispatcher, codec, "group")
    assert call(dispatcher, codec, "add", 1) == 1


def test_an_expired_call_is_not_started() -> None:
    codec, dispatcher, impl = make()
    with pytest.raises(DeadlineExceeded, match="passed before it started"):
        call(dispatcher, codec, "note", "late", deadline=time.monotonic() - 0.001)
    assert impl.notes == []


def test_one_way_calls_send_nothing_back_even_on_error() -> None:
    codec, dispatcher, impl = make()
    payload, _ = codec.encode_call(0, "note", ("hi",), None, None)
    assert dispatcher.handle(payload, expects_reply=False) is None
    failing, _ = codec.encode_call(0, "note", ("fail",), None, None)
    assert dispatcher.handle(failing, expects_reply=False) is None
    assert dispatcher.handle(b"garbage", expects_reply=False) is None
    assert impl.notes == ["hi", "fail"]


def test_malformed_calls_get_marshal_errors() -> None:
    codec, dispatcher, _ = make()
    for data in (b"", b"\x01\x01\x00\x00\xc1", HEAD.pack(RPC_VERSION, Kind.CALL, 0) + msgpack.packb([0, "add"])):
        with pytest.raises(MarshalError):
            outcome(codec, dispatcher.handle(data))


def test_unmarshallable_results_become_errors() -> None:
    class Odd(Interface):
        @method
        def odd(self) -> object:
            return object()

    objects = ObjectTable(Odd())
    codec = Codec()
    dispatcher = Dispatcher(codec, objects, caller=ME)
    payload, _ = codec.encode_call(0, "odd", (), None, None)
    with pytest.raises(MarshalError, match="cannot marshal the result"):
        outcome(codec, dispatcher.handle(payload))


def test_exported_objects_live_while_referenced() -> None:
    objects = ObjectTable()
    cb = callback(lambda: None)
    first = objects.export(cb)
    second = objects.export(cb)
    assert first is not None and second is not None and first.object_id == second.object_id
    assert first.interface == "alpc.callback" and first.methods == {"call": False}
    assert objects.export("not an interface object") is None
    objects.release([first.object_id])
    assert objects.get(first.object_id) is not None
    objects.release([first.object_id])
    assert objects.get(first.object_id) is None
    assert callback(print, oneway=True).__alpc_methods__["call"].oneway


def test_static_class_and_instance_methods_bind_with_their_own_signatures() -> None:
    class Kinds(Interface, name="test.kinds"):
        @method
        def plain(self, a: int) -> int:
            return a

        @method
        @staticmethod
        def static(a: int, b: int) -> int:
            return a + b

        @method
        @classmethod
        def klass(cls, a: int) -> str:
            return f"{cls.__name__}:{a}"

        @method
        def replaced(self) -> str:
            return "class"

    kinds = Kinds()
    kinds.replaced = lambda suffix: "instance " + suffix  # type: ignore[method-assign]
    objects = ObjectTable(kinds)
    codec = Codec()
    dispatcher = Dispatcher(codec, objects, caller=ME)
    assert call(dispatcher, codec, "plain", 1) == 1
    assert call(dispatcher, codec, "static", 1, 2) == 3
    assert call(dispatcher, codec, "klass", 4) == "Kinds:4"
    assert call(dispatcher, codec, "replaced", "x") == "instance x"
    with pytest.raises(BadArguments):
        call(dispatcher, codec, "static", 1)

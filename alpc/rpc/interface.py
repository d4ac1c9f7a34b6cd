"""Declaring RPC interfaces: which methods a peer may call, and who may call them.

Only methods marked with ``@method`` in an ``Interface`` subclass are callable;
nothing else an object has (``__class__``, helpers, attributes) is reachable.
"""

from __future__ import annotations

import grp
import pwd
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, overload

from ..security import PeerCred

__all__ = [
    "Access",
    "Callback",
    "Interface",
    "MethodSpec",
    "callback",
    "interface_methods",
    "method",
    "version_compatible",
]

F = TypeVar("F", bound=Callable[..., Any])

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}")


@dataclass(frozen=True)
class Access:
    """Who may call a method: a caller passes if its uid is listed or it is in a listed group.

    Groups are gids or names. Membership is the caller's primary gid (from the
    kernel) or the group's member list in the group database.
    """

    uids: frozenset[int] = frozenset()
    groups: frozenset[int | str] = frozenset()

    def resolve(self) -> ResolvedAccess:
        """Group names to gids; raises ValueError for a group that does not exist."""
        gids = set()
        for group in self.groups:
            if isinstance(group, int):
                gids.add(group)
                continue
            try:
                gids.add(grp.getgrnam(group).gr_gid)
            except KeyError:
                raise ValueError(f"no group named {group!r}") from None
        return ResolvedAccess(self.uids, frozenset(gids))


@dataclass(frozen=True)
class ResolvedAccess:
    uids: frozenset[int]
    gids: frozenset[int]

    def allows(self, caller: PeerCred) -> bool:
        if caller.uid in self.uids or caller.gid in self.gids:
            return True
        if not self.gids:
            return False
        try:
            user = pwd.getpwuid(caller.uid).pw_name
        except KeyError:
            return False
        for gid in self.gids:
            try:
                if user in grp.getgrgid(gid).gr_mem:
                    return True
            except KeyError:
                continue
        return False


@dataclass(frozen=True)
class MethodSpec:
    """One declared method: its name, whether it is one-way, and who may call it."""

    name: str
    oneway: bool = False
    access: Access | None = None


@dataclass(frozen=True)
class _Marker:
    oneway: bool
    access: Access | None


def _ids(value: Any, kinds: tuple[type, ...], what: str) -> frozenset[Any]:
    if value is None:
        return frozenset()
    items = [value] if isinstance(value, kinds) else list(value)
    for item in items:
        if not isinstance(item, kinds) or isinstance(item, bool):
            raise TypeError(f"{what} must be given as {' or '.join(k.__name__ for k in kinds)}, not {item!r}")
    return frozenset(items)


@overload
def method(fn: F, /) -> F: ...


@overload
def method(
    *,
    oneway: bool = False,
    require_uid: int | Iterable[int] | None = None,
    require_group: int | str | Iterable[int | str] | None = None,
) -> Callable[[F], F]: ...


def method(
    fn: F | None = None,
    /,
    *,
    oneway: bool = False,
    require_uid: int | Iterable[int] | None = None,
    require_group: int | str | Iterable[int | str] | None = None,
) -> F | Callable[[F], F]:
    """Declare a method of an Interface callable by peers.

    ``oneway``: the caller sends a datagram and does not wait (the result is
    dropped). ``require_uid`` / ``require_group``: only callers with one of
    these uids, or in one of these groups, may call it; others get AccessDenied.
    """
    uids = _ids(require_uid, (int,), "require_uid")
    groups = _ids(require_group, (int, str), "require_group")
    access = Access(uids, groups) if uids or groups else None

    def mark(function: F) -> F:
        if not (callable(function) or isinstance(function, classmethod)):
            raise TypeError(f"@method decorates a function, not {function!r}")
        function.__alpc_rpc__ = _Marker(bool(oneway), access)  # type: ignore[attr-defined]
        return function

    return mark(fn) if fn is not None else mark


def version_compatible(client: tuple[int, int], server: tuple[int, int]) -> bool:
    """The major versions match and the server's minor is at least the client's."""
    return client[0] == server[0] and server[1] >= client[1]


class Interface:
    """Base of RPC interfaces. Subclass with ``name=`` and ``version=`` and mark methods with ``@method``.

    An implementation subclasses the interface and overrides its methods; the
    declarations (one-way, access) are inherited. A client builds its proxy from
    the interface class alone.
    """

    __alpc_name__: ClassVar[str] = ""
    __alpc_version__: ClassVar[tuple[int, int]] = (1, 0)
    __alpc_methods__: ClassVar[Mapping[str, MethodSpec]] = {}

    def __init_subclass__(cls, *, name: str | None = None, version: tuple[int, int] | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        methods: dict[str, MethodSpec] = {}
        for base in reversed(cls.__mro__[1:]):
            methods.update(getattr(base, "__alpc_methods__", {}))
        for attr, value in cls.__dict__.items():
            marker = getattr(value, "__alpc_rpc__", None)
            if not isinstance(marker, _Marker):
                continue
            if attr.startswith("_"):
                raise TypeError(f"{cls.__qualname__}.{attr}: RPC method names may not start with '_'")
            methods[attr] = MethodSpec(attr, marker.oneway, marker.access)
        cls.__alpc_methods__ = methods
        if name is not None:
            if not _NAME.fullmatch(name):
                raise ValueError(f"invalid interface name {name!r}")
            cls.__alpc_name__ = name
        elif not cls.__alpc_name__:
            cls.__alpc_name__ = cls.__name__
        if version is not None:
            if (not isinstance(version, tuple) or len(version) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31
                               for v in version)):
                raise ValueError(f"interface version must be (major, minor), got {version!r}")
            cls.__alpc_version__ = version


def interface_methods(obj: object) -> Mapping[str, MethodSpec] | None:
    """The declared methods of an interface object or class; None if it is not one."""
    cls = obj if isinstance(obj, type) else type(obj)
    if not issubclass(cls, Interface):
        return None
    return cls.__alpc_methods__


class Callback(Interface, name="alpc.callback"):
    """Wraps a function so it can be passed to a peer, who calls it like a function."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    @method
    def call(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


class OnewayCallback(Callback, name="alpc.callback.oneway"):
    """A Callback the peer fires without waiting for it to run."""

    @method(oneway=True)
    def call(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


def callback(fn: Callable[..., Any], *, oneway: bool = False) -> Callback:
    """Make ``fn`` passable as an argument; the peer calls it as ``arg(...)``, nested in the call."""
    return OnewayCallback(fn) if oneway else Callback(fn)

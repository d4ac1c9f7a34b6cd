"""Peers for tests/test_rpc_groups.py: RPC servers whose access rules name a group.

Run as ``python tests/rpc_group_peers.py ROLE NAME --runtime-dir DIR``; a role prints
``READY`` once it serves and runs until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import os
import sys
from typing import NoReturn

from rpc_peer_main import parse_role

import alpc
from alpc import rpc


class Guarded(rpc.Interface, name="test.groups.guarded", version=(1, 0)):
    """An open method beside one only members of the server's primary group may call."""

    @rpc.method
    def ping(self) -> str: ...

    @rpc.method(require_group=grp.getgrgid(os.getgid()).gr_name)
    def members_only(self) -> str: ...


class GuardedImpl(Guarded):
    def ping(self) -> str:
        return "pong"

    def members_only(self) -> str:
        return "member"


class AsyncGuardedImpl(Guarded):
    async def ping(self) -> str:
        return "pong"

    async def members_only(self) -> str:
        return "member"


def _no_such_group(name: str) -> NoReturn:
    raise KeyError(f"getgrnam(): name not found: {name!r}")


def forget_groups() -> None:
    """The group database loses every group, as when an admin deletes the group the rule names."""
    grp.getgrnam = _no_such_group


def blocking_server(args: argparse.Namespace) -> None:
    with rpc.Server(args.name, GuardedImpl(), workers=2, config=alpc.Config.from_env(args.runtime_dir)):
        forget_groups()
        print("READY", flush=True)
        sys.stdin.read()


def async_server(args: argparse.Namespace) -> None:
    async def main() -> None:
        async with rpc.aio.Server(args.name, AsyncGuardedImpl(), config=alpc.Config.from_env(args.runtime_dir)):
            forget_groups()
            print("READY", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


def main() -> None:
    args = parse_role()
    {"server": blocking_server, "async-server": async_server}[args.role](args)


if __name__ == "__main__":
    main()

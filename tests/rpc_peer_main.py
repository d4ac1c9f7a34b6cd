"""The command line every RPC test peer shares.

``python tests/<peers>.py server|async-server NAME --runtime-dir DIR`` serves an
implementation with ``rpc.Server`` (two workers) or ``rpc.aio.Server``, prints
``READY <pid>`` and serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import alpc
from alpc import rpc

__all__ = ["ROLES", "parse_role", "serve_until_stdin_closes", "start_peer"]


def parse_role() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "async-server"])
    parser.add_argument("name")
    parser.add_argument("--runtime-dir", required=True)
    return parser.parse_args()


def serve_until_stdin_closes(blocking: rpc.Interface, asynchronous: rpc.Interface) -> None:
    """Serve ``blocking`` (role server) or ``asynchronous`` (role async-server) on NAME."""
    args = parse_role()
    config = alpc.Config.from_env(args.runtime_dir)
    if args.role == "server":
        with rpc.Server(args.name, blocking, workers=2, config=config):
            print("READY", os.getpid(), flush=True)
            sys.stdin.read()
        return

    async def serve() -> None:
        async with rpc.aio.Server(args.name, asynchronous, config=config):
            print("READY", os.getpid(), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(serve())


# The roles every such peer takes.
ROLES = ["server", "async-server"]


def start_peer(spawn: Any, peers: Path, role: str, name: str, runtime_dir: Path) -> Any:
    """Start the peers module ``peers`` as ``role`` serving ``name`` (a test's ``spawn``), once READY."""
    peer = spawn.argv([sys.executable, str(peers), role, name, "--runtime-dir", str(runtime_dir)])
    peer.expect("READY")
    return peer

"""Command-line client of examples/kv_service.py.

    python examples/kv_cli.py set greeting hello [--ttl 5]
    python examples/kv_cli.py get greeting          # exit 1 if missing
    python examples/kv_cli.py del greeting
    python examples/kv_cli.py keys [PREFIX]
    python examples/kv_cli.py dump [PREFIX]         # the service calls back into this process per key
    python examples/kv_cli.py stats
    python examples/kv_cli.py clear
"""

from __future__ import annotations

import argparse
import json
import sys

from kv_api import PORT_NAME, KeyValue

import alpc
from alpc import rpc


def run(kv: KeyValue, args: argparse.Namespace) -> int:
    if args.command == "get":
        value = kv.get(args.key)
        if value is None:
            print(f"{args.key}: not found", file=sys.stderr)
            return 1
        sys.stdout.buffer.write(bytes(value) + b"\n")
    elif args.command == "set":
        kv.set(args.key, args.value.encode(), args.ttl)
    elif args.command == "del":
        if not kv.delete(args.key):
            print(f"{args.key}: not found", file=sys.stderr)
            return 1
    elif args.command == "keys":
        for key in kv.keys(args.prefix):
            print(key)
    elif args.command == "dump":
        count = kv.dump(args.prefix, rpc.callback(lambda key, value: print(f"{key}={bytes(value).decode()}")))
        print(f"({count} keys)")
    elif args.command == "stats":
        print(json.dumps(kv.stats(), sort_keys=True))
    elif args.command == "clear":
        print(f"cleared {kv.clear()} keys")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=PORT_NAME)
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call timeout in seconds")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("get").add_argument("key")
    setter = commands.add_parser("set")
    setter.add_argument("key")
    setter.add_argument("value")
    setter.add_argument("--ttl", type=float)
    commands.add_parser("del").add_argument("key")
    commands.add_parser("keys").add_argument("prefix", nargs="?", default="")
    commands.add_parser("dump").add_argument("prefix", nargs="?", default="")
    commands.add_parser("stats")
    commands.add_parser("clear")
    args = parser.parse_args()
    try:
        with rpc.connect(KeyValue, args.name, timeout=args.timeout, call_timeout=args.timeout) as client:
            return run(client.proxy, args)
    except alpc.AlpcError as exc:
        print(f"kv_cli: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

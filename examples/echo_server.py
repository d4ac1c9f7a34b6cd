"""An echo server: creates the named port "demo.echo" and answers every client.

Run a broker first (`alpc broker`), then this, then examples/echo_client.py.
"""

from __future__ import annotations

import signal
import sys

import alpc


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "demo.echo"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with alpc.create_port(name) as port:
        print(f"READY serving {name!r}", flush=True)
        while True:
            event = port.wait()
            if isinstance(event, alpc.ConnectionRequest):
                print(f"server: connect from pid {event.client.pid} uid {event.client.uid}: {event.data!r}",
                      flush=True)
                try:
                    event.accept(data=b"welcome")
                except alpc.PeerGone:
                    # The client gave up between its connect and this accept: serve the others.
                    print(f"server: pid {event.client.pid} went away before its accept", flush=True)
            elif event.type is alpc.MessageType.REQUEST:
                event.reply(event.data.upper())
            elif event.type is alpc.MessageType.DATAGRAM:
                print(f"server: datagram {event.data!r}", flush=True)
            else:
                print(f"server: {event.type.name} from pid {event.sender.pid}: {event.reason}", flush=True)


if __name__ == "__main__":
    main()

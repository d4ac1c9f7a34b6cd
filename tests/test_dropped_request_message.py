"""A request Message the server's application drops unanswered is really dropped: the port does not
keep it alive, so the fds it brought are closed (README: "untaken ones are closed when it is
dropped"), and the runtime answers it (UNANSWERED: tests/test_unanswered.py). A Message kept and
answered later from another thread is unaffected."""

from __future__ import annotations

import gc
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import alpc

PEERS = str(Path(__file__).resolve().parent / "dropped_peers.py")
NAME = "svc.rpc.order.drop"
KINDS = frozenset({alpc.HandleKind.PIPE})


@pytest.mark.timeout(60)
def test_a_request_dropped_unanswered_closes_its_fds(broker: alpc.Broker, spawn: Any, runtime_dir: Path,
                                                     config: alpc.Config) -> None:
    with alpc.create_port(NAME, alpc.PortAttributes(handle_kinds=KINDS), config=config) as port:
        client = spawn.argv([sys.executable, PEERS, "fd-client", NAME, "--runtime-dir", str(runtime_dir)])
        with port.listen(timeout=10).accept() as comm:
            client.expect("SENT")
            message = comm.receive(timeout=10)
            assert message.type is alpc.MessageType.REQUEST and len(message.fds) == 1
            client.send("CHECK")
            assert client.expect("") == ["OPEN"]  # the message holds the pipe's only read end
            del message  # dropped unanswered
            gc.collect()
            client.send("CHECK")
            assert client.expect("") == ["CLOSED"]
            client.send("AGAIN")  # the connection serves on
            again = comm.receive(timeout=10)
            assert again.data == b"again"
            again.reply(b"answered")
            assert client.expect("REPLY") == ["answered"]


@pytest.mark.timeout(60)
def test_a_request_kept_elsewhere_is_answered_from_another_thread(local_pair: Any) -> None:
    server, client = local_pair
    pending = client.start_request(b"later", timeout=10)
    kept: list[alpc.Message] = [server.receive(timeout=10)]
    gc.collect()
    replier = threading.Thread(target=lambda: kept.pop().reply(b"answered later"))
    replier.start()
    replier.join(10)
    assert pending.result(10).data == b"answered later"

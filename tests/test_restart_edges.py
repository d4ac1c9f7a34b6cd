"""Restart and registration edges: what a connect cut off by a dying broker reports, and a
port closed while another thread is about to poll its broker link.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fd_reuse import fd_numbered

import alpc
import alpc.port
import alpc.server
from alpc import handover


def _cli_broker(spawn, runtime_dir: Path):  # type: ignore[no-untyped-def]
    broker = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "broker"])
    assert broker.expect("READY") == [str(runtime_dir / "broker.sock")]
    return broker


@pytest.mark.timeout(60)
def test_a_connect_cut_off_by_a_killed_broker_reports_the_broker(spawn, runtime_dir: Path, config: alpc.Config,  # type: ignore[no-untyped-def]
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker dies after the client sent CONNECT but before it passed the socket on.

    No server was ever involved (the port does not even exist), yet connect used to raise
    PeerGone("the server of ... went away before answering"): the README promises
    BrokerUnavailable while no broker runs, and an operator reading the old message looks
    for a dead server that never was.
    """
    broker = _cli_broker(spawn, runtime_dir)
    waiting = threading.Event()
    real_read_frame = alpc.port.read_frame

    def read_frame(*args, **kwargs):  # type: ignore[no-untyped-def]
        waiting.set()  # CONNECT is in the broker's socket: only the answer is awaited now
        return real_read_frame(*args, **kwargs)

    monkeypatch.setattr(alpc.port, "read_frame", read_frame)
    outcome: dict[str, BaseException] = {}

    def client() -> None:
        try:
            alpc.connect("svc.nobody", config=config, timeout=20).close()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    broker.proc.send_signal(signal.SIGSTOP)  # it accepts nothing more: the connect waits in the backlog
    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert waiting.wait(10)
        broker.kill()  # SIGKILL (delivered to a stopped process too) and reaped
        thread.join(15)
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), alpc.BrokerUnavailable), outcome
    finally:
        thread.join(15)
        (runtime_dir / "broker.sock").unlink(missing_ok=True)
        (runtime_dir / "broker.lock").unlink(missing_ok=True)


def _paused_before(monkeypatch: pytest.MonkeyPatch, module: object, attribute: str,
                   ) -> tuple[threading.Event, threading.Event, list[object]]:
    """Patch ``module.attribute`` so that its first call stops until released: (reached, release, its args)."""
    reached, release = threading.Event(), threading.Event()
    seen: list[object] = []
    real: Callable[..., object] = getattr(module, attribute)

    def paused(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not seen:
            seen.append(args)
            reached.set()
            release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attribute, paused)
    return reached, release, seen


@pytest.mark.timeout(60)
def test_close_while_listen_is_about_to_poll_the_link(broker: alpc.Broker, config: alpc.Config,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """listen() takes the link's fd under the port's lock and polls it without: a close() in
    between closed that fd, the number went to the next file opened (here a pipe nobody
    writes) and listen() slept on it for its whole timeout (for ever with timeout=None)
    instead of raising ConnectionClosed at once."""
    reached, release, seen = _paused_before(monkeypatch, alpc.server, "wait_readable")
    port = alpc.create_port("svc.closing", config=config)
    outcome: dict[str, object] = {}

    def listener() -> None:
        started = time.monotonic()
        try:
            port.listen(timeout=10)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc
        outcome["took"] = time.monotonic() - started

    thread = threading.Thread(target=listener)
    thread.start()
    keep: list[int] = []
    try:
        assert reached.wait(10)
        (fds,) = seen[0][:1]  # type: ignore[index]
        port.close()
        fd_numbered(fds[0], keep)  # the number is free again only if close() let it go
        release.set()
        thread.join(20)
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), alpc.ConnectionClosed), outcome
        assert outcome["took"] < 5.0
    finally:
        release.set()
        thread.join(20)
        for fd in keep:
            os.close(fd)
        port.close()


PEERS = Path(__file__).resolve().parent / "restart_edge_peers.py"


@pytest.mark.timeout(60)
def test_a_port_whose_owner_is_gone_before_the_broker_reads_it_is_not_kept(  # type: ignore[no-untyped-def]
        runtime_dir: Path, config: alpc.Config, spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before Linux 6.5 (no SO_PEERPIDFD) the broker watches an owner through pidfd_open(pid),
    which fails for a process already gone: that was taken for "no pidfds in this kernel", so a
    port whose owner died (and was reaped) before the broker read its CREATE_PORT, or during a
    handover before the successor adopted it, was kept for as long as a forked worker held the
    socket: the name taken, every connect waiting for nobody. The same holds for a successor."""
    monkeypatch.setattr(alpc.transport, "SO_PEERPIDFD", 0x7FFF)  # ENOPROTOOPT, as a kernel before 6.5
    broker = alpc.Broker(runtime_dir)
    broker.bind()  # listening, not yet reading: the request waits in the socket
    serving = threading.Thread(target=broker.serve_forever)
    worker = None
    try:
        owner = spawn.argv([sys.executable, str(PEERS), "orphan-registration", "svc.orphan",
                            "--runtime-dir", str(runtime_dir)])
        (worker,) = (int(word) for word in owner.expect("READY"))
        assert owner.proc.wait(10) == 0  # gone and reaped; its worker holds the socket
        serving.start()
        with alpc.create_port("svc.orphan", config=config, timeout=5) as port:
            assert port.name == "svc.orphan"
    finally:
        if worker is not None:
            os.kill(worker, signal.SIGKILL)
        if serving.is_alive():
            broker.stop()
            serving.join(10)
        else:
            broker.stop()
            broker.serve_forever()  # runs the shutdown at once: the stop flag is set


@pytest.mark.timeout(60)
def test_a_port_whose_owner_dies_during_a_handover_is_not_kept_by_the_successor(  # type: ignore[no-untyped-def]
        runtime_dir: Path, config: alpc.Config, spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner dies (and is reaped) after the old broker exported its state, before the
    successor watches it: on a kernel without SO_PEERPIDFD the successor kept the port for as
    long as the owner's forked worker lived."""
    monkeypatch.setattr(alpc.transport, "SO_PEERPIDFD", 0x7FFF)  # ENOPROTOOPT, as a kernel before 6.5
    worker = None
    with alpc.Broker(runtime_dir):
        owner = spawn.argv([sys.executable, str(PEERS), "orphan-registration", "svc.handed", "--linger",
                            "--runtime-dir", str(runtime_dir)])
        (worker,) = (int(word) for word in owner.expect("READY"))
        real_send_state = handover.send_state

        def send_state(*args, **kwargs):  # type: ignore[no-untyped-def]
            owner.proc.stdin.close()  # the owner exits now, its port already exported
            assert owner.proc.wait(10) == 0
            return real_send_state(*args, **kwargs)

        monkeypatch.setattr(handover, "send_state", send_state)
        successor = alpc.Broker(runtime_dir, replace=True)
        try:
            successor.start()
            with alpc.create_port("svc.handed", config=config, timeout=5) as port:
                assert port.name == "svc.handed"
        finally:
            os.kill(worker, signal.SIGKILL)
            successor.stop()

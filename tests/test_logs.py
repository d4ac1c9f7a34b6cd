"""Logging: structured fields, journald-friendly output, and no flooding."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

import alpc
import alpc.port
from alpc.logs import LogLimiter, StructuredFormatter, fields, journald_priority, stderr_is_journal
from alpc.wire import MessageType, encode_frame


def record(level: int = logging.WARNING, message: str = "refused it", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("alpc.broker", level, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_plain_format_has_time_level_and_fields() -> None:
    text = StructuredFormatter().format(record(**fields(port="svc.a", pid=12, uid=1000)))
    stamp, _, rest = text.partition(" WARNING ")
    assert time.strptime(stamp.split(",")[0], "%Y-%m-%d %H:%M:%S")
    assert rest == "alpc.broker: refused it port=svc.a peer_pid=12 peer_uid=1000"


def test_journald_format_has_priorities_and_no_time() -> None:
    formatter = StructuredFormatter(journald=True)
    assert formatter.format(record(logging.INFO, "hello", port="p")) == "<6>alpc.broker: hello port=p"
    assert formatter.format(record(logging.ERROR, "two\nlines")) == "<3>alpc.broker: two\n<3>lines"
    assert [journald_priority(level) for level in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


def test_journal_stream_must_name_our_stderr(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream:
        info = os.fstat(stream.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, stream)
        assert not stderr_is_journal({}, stream)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_limiter_logs_once_per_key_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limiter = LogLimiter(logging.getLogger("alpc.test"), interval=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="alpc.test"):
        assert limiter.log(logging.WARNING, ("x", 1), "refused pid 1")
        assert not any(limiter.log(logging.WARNING, ("x", 1), "refused pid 1") for _ in range(99))
        assert limiter.log(logging.WARNING, ("x", 2), "refused pid 2")  # another peer
        clock.now += 10
        assert limiter.log(logging.WARNING, ("x", 1), "refused pid 1")
        assert limiter.log(logging.WARNING, ("y", 1), "quota", extra=fields(pid=1))
        limiter.log(logging.WARNING, ("y", 1), "quota")
        clock.now += 10
        limiter.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "refused pid 1", "refused pid 2", "refused pid 1 (99 similar suppressed)", "quota",
        "quota (repeated 1 more times)",
    ]
    assert caplog.records[-1].peer_pid == 1  # type: ignore[attr-defined]
    assert limiter.suppressed_total == 100


def test_limiter_budget_stops_a_flood_over_many_keys(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limiter = LogLimiter(logging.getLogger("alpc.test"), burst=5, rate=1.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="alpc.test"):
        written = sum(limiter.log(logging.WARNING, ("pid", pid), f"pid {pid}") for pid in range(1000))
        clock.now += 2
        written += sum(limiter.log(logging.WARNING, ("pid", pid), f"pid {pid}") for pid in range(1000, 1010))
    assert written == 7 and len(caplog.records) == 7


def test_protocol_errors_on_channels_are_logged_once_per_peer(broker: alpc.Broker, config: alpc.Config,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(alpc.port, "_limited", LogLimiter(alpc.port.log))
    with alpc.create_port("svc.noisy", config=config) as port, caplog.at_level(logging.WARNING, "alpc.port"):
        def hostile() -> None:
            for _ in range(5):
                comm = alpc.connect("svc.noisy", config=config, timeout=5)
                comm._stream.send([b"\xde\xad\xbe\xef" * 20])
                comm.close()

        thread = threading.Thread(target=hostile)
        thread.start()
        died = 0
        while died < 5:
            event = port.wait(timeout=10)
            if isinstance(event, alpc.ConnectionRequest):
                event.accept()
            elif event.type is MessageType.CLIENT_DIED:
                died += 1
        thread.join(10)
    lines = [r for r in caplog.records if "protocol error" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].peer_pid == os.getpid() and lines[0].peer_uid == os.getuid()  # type: ignore[attr-defined]


def test_broker_under_journald_logs_refusals_once(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    # The shell sets JOURNAL_STREAM to its own stderr's dev:inode, as systemd does for a journal stream.
    command = (f"JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec {sys.executable} -m alpc "
               f"--runtime-dir {runtime_dir} broker")
    broker = spawn.argv(["sh", "-c", command])
    broker.expect("READY")
    for _ in range(30):
        with pytest.raises(alpc.PortNotFound):
            alpc.connect("svc.none", config=config, timeout=5)
    for _ in range(10):
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.connect(str(config.broker_socket))
        bad.sendall(encode_frame(MessageType.CONNECT, b"\xc1 not msgpack"))
        assert bad.recv(100) == b""  # dropped
        bad.close()
    with alpc.create_port("svc.taken", config=config):
        for _ in range(5):
            with pytest.raises(alpc.NameInUse):
                alpc.create_port("svc.taken", config=config)
    broker.proc.terminate()
    assert broker.proc.wait(10) == 0
    lines = broker.expect_stderr("broker stopped", timeout=10).splitlines()
    assert all(line.startswith(("<6>", "<4>", "<3>")) for line in lines), lines
    assert lines[0] == f"<6>alpc.broker: broker listening on {config.broker_socket}"
    me = f"peer_pid={os.getpid()} peer_uid={os.getuid()}"
    refused = [line for line in lines if "no port named 'svc.none'" in line]
    assert refused == [f"<6>alpc.broker: refused pid {os.getpid()} uid {os.getuid()}: no port named 'svc.none' "
                       f"port=svc.none {me}"]
    dropped = [line for line in lines if "protocol error" in line]
    assert len(dropped) == 1 and dropped[0].startswith("<4>") and "undecodable Connect body" in dropped[0]
    taken = [line for line in lines if "is owned by live" in line]
    assert len(taken) == 1 and "port=svc.taken" in taken[0]


def test_log_level_option(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    broker = spawn.argv([sys.executable, "-m", "alpc", "--runtime-dir", str(runtime_dir), "--log-level", "warning",
                         "broker"])
    broker.expect("READY")
    with pytest.raises(alpc.PortNotFound):
        alpc.connect("svc.none", config=config, timeout=5)  # an INFO line: not shown
    with alpc.create_port("svc.dup", config=config), pytest.raises(alpc.NameInUse):
        alpc.create_port("svc.dup", config=config)  # a WARNING line: shown
    broker.proc.terminate()
    assert broker.proc.wait(10) == 0
    assert " INFO " not in broker.expect_stderr("is owned by live", timeout=10)

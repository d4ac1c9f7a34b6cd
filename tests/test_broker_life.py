"""The broker daemon's life: its notifier, signals, stdout/stderr and --ready-fd (real broker processes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import alpc

pytestmark = pytest.mark.timeout(60)

BROKER = [sys.executable, "-m", "alpc"]
# Far above a broker call's usual few ms, far below the 1 s a blocking notice took.
STALL = 0.5


def start_cli_broker(spawn, runtime_dir: Path, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    broker = spawn.argv([*BROKER, "--runtime-dir", str(runtime_dir), "broker"], env)
    assert broker.expect("READY") == [str(runtime_dir / "broker.sock")]
    return broker


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill a broker started with pipes (if it still runs), wait for it, close its pipes."""
    proc.kill()
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def full_notify_socket(runtime_dir: Path) -> Iterator[tuple[socket.socket, Path]]:
    """A NOTIFY_SOCKET whose datagram queue is full: a service manager that reads nothing."""
    path = runtime_dir.parent / f"{runtime_dir.name}.notify"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        while True:
            filler.sendto(b"FILLER=1", str(path))
    except BlockingIOError:
        pass  # the queue is full (net.unix.max_dgram_qlen)
    finally:
        filler.close()
    yield manager, path
    manager.close()
    path.unlink()


def test_a_notify_socket_nobody_reads_never_stalls_the_broker(spawn, runtime_dir: Path, config: alpc.Config,
                                                               full_notify_socket) -> None:
    """Each READY/STATUS notice waited up to 1 s for room in the manager's queue, the loop stalled."""
    manager, path = full_notify_socket
    broker = start_cli_broker(spawn, runtime_dir, {**os.environ, "NOTIFY_SOCKET": str(path)})
    ports = []
    worst = 0.0
    try:
        # Over two ticks (TICK = 1 s) with the status changing all along: a new port each call.
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            started = time.monotonic()
            if len(ports) < 50:
                ports.append(alpc.create_port(f"svc.notify.{len(ports)}", config=config, reregister_timeout=0))
            alpc.list_ports(config, timeout=10)
            worst = max(worst, time.monotonic() - started)
        assert worst < STALL, f"a broker call waited {worst:.2f}s behind a notice to a full NOTIFY_SOCKET"
        # Once the manager reads again, READY=1 still reaches it (the refused one is sent again).
        manager.settimeout(10)
        while not (notice := manager.recv(4096).decode()).startswith("READY=1\n"):
            assert notice == "FILLER=1", notice
    finally:
        for port in ports:
            port.close()
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(10) == 0
    broker.expect_stderr("could not notify the service manager")


def test_sighup_shuts_the_broker_down_cleanly(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    """SIGHUP (its terminal closed, ``kill -HUP``) killed the broker: servers saw it die, files stayed."""
    broker = start_cli_broker(spawn, runtime_dir)
    with alpc.create_port("svc.hup", config=config, reregister_timeout=0) as port:
        broker.proc.send_signal(signal.SIGHUP)
        assert broker.proc.wait(10) == 0
        with pytest.raises(alpc.BrokerUnavailable, match="shut down"):
            port.listen(timeout=5)
    assert sorted(os.listdir(runtime_dir)) == []  # neither broker.sock nor broker.lock
    broker.expect_stderr("received SIGHUP")


def test_a_stdout_nobody_reads_does_not_stop_the_broker(runtime_dir: Path, config: alpc.Config) -> None:
    """The READY line to a closed pipe raised EPIPE and the broker exited 1 right after it bound."""
    gone_r, gone_w = os.pipe()
    os.close(gone_r)  # whoever read our stdout went away
    ready_r, ready_w = os.pipe()
    try:
        proc = subprocess.Popen([*BROKER, "--runtime-dir", str(runtime_dir), "broker", "--ready-fd", str(ready_w)],
                                stdout=gone_w, stderr=subprocess.PIPE, text=True, pass_fds=[ready_w])
    finally:
        os.close(gone_w)
        os.close(ready_w)
    try:
        with os.fdopen(ready_r, "rb") as ready:
            assert ready.readline() == b"READY\n"
        assert alpc.list_ports(config) == ()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        assert "cannot write 'READY" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
    assert sorted(os.listdir(runtime_dir)) == []


def test_a_ready_fd_that_is_not_open_is_refused_before_the_broker_binds(runtime_dir: Path) -> None:
    """``--ready-fd 3`` with no fd 3: READY went into, then closed, the broker's own lock fd.

    A second broker then took the runtime dir and its socket over from the running one.
    """
    path = runtime_dir.parent / f"{runtime_dir.name}.notify"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))
    manager.settimeout(10)
    proc = subprocess.Popen([*BROKER, "--runtime-dir", str(runtime_dir), "broker", "--ready-fd", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,  # close_fds: no fd 3
                            env={**os.environ, "NOTIFY_SOCKET": str(path)})
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        if line.startswith("READY"):
            # READY=1 is notified once the ready fd was written and closed.
            assert manager.recv(4096).startswith(b"READY=1\n")
            second = alpc.Broker(runtime_dir)
            try:
                with pytest.raises(alpc.BrokerRunning):
                    second.start()
            finally:
                second.stop()
        assert line == ""
        assert proc.wait(20) == 1
        assert proc.stderr.read().strip().splitlines()[-1] == "alpc: OSError: [Errno 9] Bad file descriptor"
    finally:
        reap(proc)
        for name in ("broker.sock", "broker.lock"):
            (runtime_dir / name).unlink(missing_ok=True)
        manager.close()
        path.unlink()
    assert sorted(os.listdir(runtime_dir)) == []


def test_a_broker_started_with_stderr_closed_under_a_journal_stream_runs(spawn, runtime_dir: Path) -> None:
    """``alpc broker 2>&-`` from a session with JOURNAL_STREAM set died at once (sys.stderr is None)."""
    env = {**os.environ, "JOURNAL_STREAM": "1:1"}
    argv = ["sh", "-c", 'exec "$@" 2>&-', "sh", *BROKER, "--runtime-dir", str(runtime_dir), "broker"]
    broker = spawn.argv(argv, env)
    assert broker.expect("READY") == [str(runtime_dir / "broker.sock")]
    assert alpc.list_ports(alpc.Config.from_env(runtime_dir)) == ()
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(10) == 0
    assert sorted(os.listdir(runtime_dir)) == []


def test_ready_fd_2_cannot_send_the_brokers_log_into_a_clients_socket(runtime_dir: Path,
                                                                      config: alpc.Config) -> None:
    """``--ready-fd 2`` closed stderr after READY; the next client socket took fd 2 and got the log lines."""
    proc = subprocess.Popen([*BROKER, "--runtime-dir", str(runtime_dir), "broker", "--ready-fd", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        if proc.stdout.readline().startswith("READY"):
            # The unfixed broker serves; its "port created" line lands in this server's socket.
            with alpc.create_port("svc.fd2", config=config, reregister_timeout=0):
                pass
        assert proc.wait(20) == 1
        error = proc.stderr.read()
        assert "--ready-fd: must be an open fd from 3" in error and "Traceback" not in error, error
    finally:
        reap(proc)
    assert sorted(os.listdir(runtime_dir)) == []


def test_a_ready_fd_no_fd_can_have_is_a_bad_argument(runtime_dir: Path) -> None:
    """99999999999 (past a C int) was an OverflowError traceback after the broker had bound."""
    done = subprocess.run([*BROKER, "--runtime-dir", str(runtime_dir), "broker", "--ready-fd", "99999999999"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "--ready-fd: must be an open fd from 3" in done.stderr
    assert done.stdout == "" and sorted(os.listdir(runtime_dir)) == []


def test_a_second_broker_never_steals_a_live_socket_whose_lock_file_was_removed(spawn, runtime_dir: Path,
                                                                                config: alpc.Config) -> None:
    """With broker.lock gone (a /tmp cleaner), a second broker unlinked the live socket and bound its own.

    The first broker's servers were then out of every client's reach.
    """
    first = start_cli_broker(spawn, runtime_dir)
    with alpc.create_port("svc.kept", config=config, reregister_timeout=0):
        (runtime_dir / "broker.lock").unlink()
        second = subprocess.Popen([*BROKER, "--runtime-dir", str(runtime_dir), "broker"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert second.stdout is not None and second.stderr is not None
            assert second.stdout.readline() == "", "the second broker took the runtime dir over"
            assert second.wait(20) == 1
            assert "BrokerRunning" in second.stderr.read()
        finally:
            reap(second)
        assert [port.name for port in alpc.list_ports(config)] == ["svc.kept"]
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(10) == 0
    assert sorted(os.listdir(runtime_dir)) == []


def ignored_signals(pid: int) -> int:
    """The process's SigIgn mask (bit N-1: signal N) from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigIgn line")


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_a_signal_ignored_on_entry_stays_ignored(spawn, runtime_dir: Path, config: alpc.Config,
                                                  signum: signal.Signals) -> None:
    """``nohup alpc broker`` (SIGHUP) and a script's ``alpc broker &`` (SIGINT) must outlive that signal.

    SIGINT was taken over whatever the parent had ignored: a Ctrl-C for the script's
    foreground job stopped the background broker. (The SIGHUP case guards the SIGHUP fix.)
    """
    argv = ["sh", "-c", f'trap "" {signum.name[3:]}; exec "$@"', "sh", *BROKER, "--runtime-dir", str(runtime_dir),
            "broker"]
    broker = spawn.argv(argv)
    assert broker.expect("READY") == [str(runtime_dir / "broker.sock")]
    assert ignored_signals(broker.pid) & (1 << (signum - 1)), f"the broker took {signum.name} over"
    with alpc.create_port("svc.immune", config=config, reregister_timeout=0) as port:
        broker.proc.send_signal(signum)  # an ignored signal is discarded as it is sent: nothing left pending
        # Still serving: a query after the signal is answered, and the port is still registered.
        assert [info.name for info in alpc.list_ports(config)] == ["svc.immune"]
        assert broker.proc.poll() is None and port.registered
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(10) == 0
    assert sorted(os.listdir(runtime_dir)) == []


def test_every_status_update_names_what_the_broker_serves(spawn, runtime_dir: Path, config: alpc.Config) -> None:
    """README: ``STATUS=serving … N ports, N servers, N connected clients``, kept current.

    Only READY's STATUS said "serving <socket>:"; the first update a second later dropped it.
    """
    path = runtime_dir.parent / f"{runtime_dir.name}.notify"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))
    manager.settimeout(20)
    try:
        broker = start_cli_broker(spawn, runtime_dir, {**os.environ, "NOTIFY_SOCKET": str(path)})
        serving = f"serving {runtime_dir / 'broker.sock'}: "
        ready = dict(line.split("=", 1) for line in manager.recv(4096).decode().splitlines())
        assert ready["STATUS"] == serving + "0 ports, 0 servers, 0 connected clients"
        with alpc.create_port("svc.status", config=config, reregister_timeout=0):
            while "1 ports" not in (status := manager.recv(4096).decode()):
                pass
            assert status == f"STATUS={serving}1 ports, 1 servers, 0 connected clients"
        broker.proc.send_signal(signal.SIGTERM)
        assert broker.proc.wait(10) == 0
    finally:
        manager.close()
        path.unlink()


def test_a_broker_whose_files_were_removed_leaves_its_successors_files_alone(spawn, runtime_dir: Path,
                                                                            config: alpc.Config) -> None:
    """The runtime dir cleaned up under a running broker (logout, a /tmp cleaner), a new broker started there.

    The old broker's shutdown unlinked the new one's broker.sock (no client could find it
    any more) and broker.lock (a third broker could start beside it).
    """
    first = start_cli_broker(spawn, runtime_dir)
    for name in ("broker.sock", "broker.lock"):
        (runtime_dir / name).unlink()
    second = start_cli_broker(spawn, runtime_dir)  # nothing listens at the path: it starts
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(10) == 0
    assert sorted(os.listdir(runtime_dir)) == ["broker.lock", "broker.sock"]
    assert alpc.list_ports(config) == ()  # the second broker is still there to be found
    third = subprocess.run([*BROKER, "--runtime-dir", str(runtime_dir), "broker"], capture_output=True, text=True,
                           timeout=30)
    assert third.returncode == 1 and "BrokerRunning" in third.stderr, third.stderr
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(10) == 0
    assert sorted(os.listdir(runtime_dir)) == []


def test_a_ready_fd_nobody_reads_does_not_stop_the_broker(runtime_dir: Path, config: alpc.Config) -> None:
    """READY written to a --ready-fd whose reader went away raised EPIPE: the broker exited 1
    right after it bound, where a stdout nobody reads leaves it serving."""
    gone_r, gone_w = os.pipe()
    os.close(gone_r)
    proc = subprocess.Popen([*BROKER, "--runtime-dir", str(runtime_dir), "broker", "--ready-fd", str(gone_w)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=[gone_w])
    os.close(gone_w)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("READY")
        assert alpc.list_ports(config) == ()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "cannot write READY to --ready-fd" in proc.stderr.read()
    finally:
        reap(proc)
    assert sorted(os.listdir(runtime_dir)) == []


def test_an_empty_runtime_dir_is_a_bad_argument(tmp_path: Path) -> None:
    """``--runtime-dir ""`` (an unset shell variable) ran the broker in the current directory."""
    done = subprocess.run([*BROKER, "--runtime-dir", "", "broker"], capture_output=True, text=True, timeout=30,
                          cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "--runtime-dir: must be a directory path" in done.stderr
    assert list(tmp_path.iterdir()) == []

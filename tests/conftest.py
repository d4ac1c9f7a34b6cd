"""Shared fixtures: a private runtime dir, brokers, real peer processes, and a leak check."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from local_pairs import local_connection  # tests/ is on sys.path

import alpc
from alpc.config import BROKER_SOCKET_NAME

# pytester runs the leak check itself against leaky tests (tests/test_leak_check.py).
pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers.py"
LINE_TIMEOUT = 20.0
# Every POSIX shm name this session (and every child it starts) creates carries
# this prefix, so test runs sharing the machine never see each other's names.
# It avoids the substring "alpc" on purpose: older leak checks unlink any new
# name containing it, which would delete this session's live sections.
SHM_PREFIX = f"lpct{os.getpid()}-"
os.environ["ALPC_SHM_PREFIX"] = SHM_PREFIX
# A test (or a child) that forgets its runtime dir lands in this session's own
# default rather than the machine's, and the leak check looks there too.
DEFAULT_RUNTIME_DIR = Path(tempfile.mkdtemp(prefix=f"alpc-tests-{os.getpid()}-"))
os.environ["ALPC_RUNTIME_DIR"] = str(DEFAULT_RUNTIME_DIR)


class _RuntimeDirs:
    """The runtime dirs the current test uses, checked for socket files once it is done.

    In a dir made for the test (``runtime_dir``, the session default) any
    socket file is a leak; in ``tmp_path``, which tests also use for sockets
    of their own, only alpc's (``broker.sock``, the one pathname socket alpc makes).
    """

    def __init__(self) -> None:
        self.owned: list[Path] = []
        self.scratch: list[Path] = []

    def sockets(self) -> list[str]:
        found = [str(path) for root in [DEFAULT_RUNTIME_DIR, *self.owned] for path in _sockets(root, deep=False)]
        found += [str(path) for root in self.scratch for path in _sockets(root, deep=True)
                  if path.name == BROKER_SOCKET_NAME]
        return found

    def remove(self) -> None:
        for path in self.owned:
            shutil.rmtree(path, ignore_errors=True)
        for path in _sockets(DEFAULT_RUNTIME_DIR, deep=False):
            path.unlink()
        self.owned.clear()
        self.scratch.clear()


_RUNTIME_DIRS = _RuntimeDirs()


def _sockets(root: Path, deep: bool) -> list[Path]:
    """Socket files under ``root`` (its subdirectories too when ``deep``)."""
    found: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return found
    for entry in entries:
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISSOCK(mode):
            found.append(Path(entry.path))
        elif deep and stat.S_ISDIR(mode):
            found += _sockets(Path(entry.path), deep)
    return found


def pytest_sessionfinish() -> None:
    shutil.rmtree(DEFAULT_RUNTIME_DIR, ignore_errors=True)


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _shm_names() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(SHM_PREFIX)}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail any test that leaves an fd, a /dev/shm name, a child process or a socket file behind.

    Socket files are looked for in the runtime dirs the test used (see
    ``_RuntimeDirs``), after its children are gone.
    """
    fds_before = _open_fds()
    shm_before = _shm_names()
    yield
    me = psutil.Process()
    children = me.children(recursive=True)
    for child in children:
        child.kill()
    psutil.wait_procs(children, timeout=5)
    leaked_fds = {fd: _fd_target(fd) for fd in _open_fds() - fds_before}
    leaked_fds = {fd: target for fd, target in leaked_fds.items() if target != "?"}
    leaked_shm = _shm_names() - shm_before
    leaked_sockets = _RUNTIME_DIRS.sockets()
    _RUNTIME_DIRS.remove()
    problems = []
    if children:
        problems.append(f"child processes left running: {[c.pid for c in children]}")
    if leaked_fds:
        problems.append(f"fds leaked: {leaked_fds}")
    if leaked_shm:
        for name in leaked_shm:
            os.unlink(f"/dev/shm/{name}")
        problems.append(f"/dev/shm names leaked: {sorted(leaked_shm)}")
    if leaked_sockets:
        problems.append(f"socket files left behind: {sorted(leaked_sockets)}")
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def runtime_dir() -> Path:
    """A private 0700 runtime dir; the leak check fails the test if a socket file is left in it."""
    path = Path(tempfile.mkdtemp(prefix="alpc-test-"))
    os.chmod(path, 0o700)
    _RUNTIME_DIRS.owned.append(path)
    return path


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    """pytest's tmp_path, which tests also use as a runtime dir: checked for broker sockets."""
    _RUNTIME_DIRS.scratch.append(tmp_path)
    return tmp_path


@pytest.fixture
def config(runtime_dir: Path) -> alpc.Config:
    return alpc.Config.from_env(runtime_dir)


@pytest.fixture
def broker(runtime_dir: Path) -> Iterator[alpc.Broker]:
    with alpc.Broker(runtime_dir) as running:
        yield running


@pytest.fixture
def local_pair(broker: alpc.Broker, config: alpc.Config) -> Iterator[tuple[alpc.CommunicationPort,
                                                                         alpc.CommunicationPort]]:
    """(server side, client side) of one connection, both in this process; closed afterwards."""
    with local_connection(config, "svc.local.pair") as (_, server, client):
        yield server, client


class Peer:
    """A child process speaking the line protocol of tests/peers.py (or any READY-line program)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1, cwd=ROOT, env=env, pass_fds=pass_fds,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        # stderr has its own pipe and pump: a line there has no order against stdout's lines.
        self._stderr_grew = threading.Condition()
        self._stderr_done = False
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self._lines.put(line.rstrip("\n"))
        except ValueError:
            pass  # the test closed the pipe while this thread was between reads
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            for line in self.proc.stderr:
                with self._stderr_grew:
                    self._stderr.append(line)
                    self._stderr_grew.notify_all()
        except ValueError:
            pass  # as in _pump
        with self._stderr_grew:
            self._stderr_done = True
            self._stderr_grew.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, prefix: str, timeout: float = LINE_TIMEOUT) -> list[str]:
        """Wait for the next line starting with ``prefix``; returns its words after it."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line within {timeout}s; stderr: {''.join(self._stderr)}") from None
            if line is None:
                raise AssertionError(f"peer exited before {prefix!r}; stderr: {''.join(self._stderr)}")
            if line.startswith(prefix):
                return line[len(prefix):].split()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            # Say what became of the peer: a bare broken pipe leaves a flake undiagnosable.
            code = self.proc.wait(5)
            raise AssertionError(f"peer exited with {code} before {line!r} could be sent; "
                                 f"stderr: {''.join(self._stderr)}") from None

    def stderr(self) -> str:
        return "".join(self._stderr)

    def expect_stderr(self, text: str, timeout: float = LINE_TIMEOUT) -> str:
        """Wait until ``text`` is on the peer's stderr (or it closed without it); the whole stderr.

        A line the peer wrote before a stdout line (or before it exited) may still be on its
        way through the stderr pump when the test has seen that stdout line: wait for it.
        """
        with self._stderr_grew:
            self._stderr_grew.wait_for(lambda: self._stderr_done or text in "".join(self._stderr), timeout)
            seen = "".join(self._stderr)
        if text not in seen:
            raise AssertionError(f"{text!r} not on the peer's stderr within {timeout}s; stderr: {seen}")
        return seen

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        for stream in (self.proc.stdin,):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn(runtime_dir: Path) -> Iterator[object]:
    """spawn(role, name, *args) starts tests/peers.py; every peer is killed at teardown."""
    peers: list[Peer] = []

    def start(role: str, name: str, *args: str) -> Peer:
        peer = Peer([sys.executable, str(PEERS), role, name, "--runtime-dir", str(runtime_dir), *args])
        peers.append(peer)
        return peer

    def start_argv(argv: list[str], env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()) -> Peer:
        peer = Peer(argv, env, pass_fds)
        peers.append(peer)
        return peer

    start.argv = start_argv  # type: ignore[attr-defined]
    yield start
    for peer in peers:
        peer.close()

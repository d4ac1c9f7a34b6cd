"""The C extension and its pure-Python twin: selection, stale-build detection, agreement."""

from __future__ import annotations

import errno
import os
import shutil
import site
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpc import _native
from alpc.errors import SectionError

ROOT = Path(__file__).resolve().parent.parent


def _isolated(tree: Path, code: str, **env_changes: str | None) -> subprocess.CompletedProcess[str]:
    """Import alpc from ``tree`` only: -S skips the .pth of the editable install."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *site.getsitepackages()])}
    env.pop("ALPC_PUREPYTHON", None)
    env.pop("ALPC_REQUIRE_NATIVE", None)
    for key, value in env_changes.items():
        if value is not None:
            env[key] = value
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=60)


def test_selected_implementation_matches_the_environment() -> None:
    if os.environ.get("ALPC_PUREPYTHON") == "1":
        assert _native.IMPLEMENTATION == "python"
    elif os.environ.get("ALPC_REQUIRE_NATIVE") == "1":
        assert _native.IMPLEMENTATION == "c"


def test_error_codes_agree_with_the_c_header() -> None:
    header = (ROOT / "csrc" / "alpc_native.h").read_text()
    for name in ("MAGIC", "VERSION", "TYPE", "FLAGS", "RESERVED", "DATA", "ATTR", "FDS",
                 "ATTR_KIND", "ATTR_LENGTH", "ATTR_DUP", "ATTR_TRUNC", "ATTR_VALUE"):
        value = getattr(_native, f"E_{name}")
        assert f"ALPC_E_{name} = {value}," in header
    assert f"ALPC_E_RANGE = {_native.E_RANGE}," in header
    assert f"ALPC_E_TIMEOUT = {_native.E_TIMEOUT}," in header
    assert f"ALPC_E_WATCH = {_native.E_WATCH}\n" in header
    sizes = dict(zip((1, 2, 3, 4, 5), ("REF", "NEW", "GRANT", "RANGE", "DEADLINE"), strict=True))
    for kind, name in sizes.items():
        assert f"ALPC_{name}_SIZE = {_native.ATTR_SIZES[kind]}" in header


def test_source_hash_changes_with_the_sources(tmp_path: Path) -> None:
    copy = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", copy)
    before = _native.source_hash(copy)
    with (copy / "alpc_native.c").open("a") as f:
        f.write("\n/* edited */\n")
    assert before is not None and _native.source_hash(copy) != before
    assert _native.source_hash(tmp_path / "missing") is None


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="needs the built extension")
def test_stale_build_is_detected_at_import(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "alpc", tree / "alpc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    with (tree / "csrc" / "alpc_native.c").open("a") as f:
        f.write("\n/* edited after the build */\n")
    result = _isolated(tree, "import alpc")
    assert result.returncode != 0
    assert "NativeBuildError" in result.stderr and "stale" in result.stderr


def test_missing_extension_is_an_error_when_required(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "alpc", tree / "alpc",
                    ignore=shutil.ignore_patterns("__pycache__", "_alpc_native*"))
    result = _isolated(tree, "import alpc", ALPC_REQUIRE_NATIVE="1")
    assert result.returncode != 0 and "not built" in result.stderr
    result = _isolated(tree, "import alpc._native as n; print(n.IMPLEMENTATION)")
    assert result.stdout.strip() == "python", result.stderr


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="needs the built extension")
def test_c_scanner_rejects_bad_arguments() -> None:
    ffi, lib = _native._ext  # type: ignore[misc]
    count = ffi.new("size_t *")
    ends = ffi.new("size_t[4]")
    limits = ffi.new("alpc_limits *")
    buf = ffi.from_buffer(b"x" * 8)
    assert lib.alpc_scan_frames(buf, 8, 9, limits, ends, 4, count) == lib.ALPC_E_ARGS
    assert lib.alpc_scan_frames(ffi.NULL, 0, 0, limits, ends, 4, count) == lib.ALPC_E_ARGS
    assert lib.alpc_scan_frames(buf, 8, 0, limits, ends, 4, ffi.NULL) == lib.ALPC_E_ARGS


# -- ranges, copies, direct memory --------------------------------------------------------

_U64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=500)
@given(_U64, _U64, _U64, _U64)
def test_range_checks_agree_and_never_overflow(offset: int, length: int, size: int, max_length: int) -> None:
    expected = 0 < length <= max_length and offset + length <= size
    assert _native._check_range_py(offset, length, size, max_length) is expected
    if _native.IMPLEMENTATION == "c":
        assert _native._check_range_c(offset, length, size, max_length) is expected


@pytest.mark.parametrize("size", [10, _native.COPY_IN_C_ABOVE + 3])
def test_copies_small_and_large(size: int) -> None:
    source = os.urandom(size)
    target = bytearray(size)
    _native.copy_into(memoryview(target), source)
    assert target == source
    assert _native.copy_out(memoryview(source)) == source
    with pytest.raises((ValueError, TypeError)):
        _native.copy_into(memoryview(target), source + b"x")


def test_direct_memory_is_checked_against_the_grant() -> None:
    buffer = bytearray(b"0123456789")
    pinned = _native.buffer_address(buffer, True)
    try:
        into = bytearray(4)
        assert _native.vm_read(os.getpid(), pinned.address, pinned.length, 3, into) == 4 and into == b"3456"
        assert _native.vm_write(os.getpid(), pinned.address, pinned.length, 8, b"ab") == 2
        assert buffer == b"01234567ab"
        assert _native.vm_read(os.getpid(), pinned.address, pinned.length, 8, into) == _native.E_RANGE
        assert _native.vm_write(os.getpid(), pinned.address, pinned.length, 11, b"") == _native.E_RANGE
        assert _native.vm_read(os.getpid(), pinned.address, (1 << 64) - 1, 0, into) == _native.E_RANGE
        assert _native.vm_read(os.getpid(), 8, 16, 0, into) == -errno.EFAULT
    finally:
        pinned.release()


def test_pinning_read_only_and_writable_buffers() -> None:
    data = b"immutable"
    pinned = _native.buffer_address(data, False)
    into = bytearray(len(data))
    assert _native.vm_read(os.getpid(), pinned.address, pinned.length, 0, into) == len(data) and into == data
    pinned.release()
    pinned.release()
    with pytest.raises(SectionError, match="writable"):
        _native.buffer_address(data, True)


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="needs the built extension")
def test_c_helpers_reject_bad_arguments() -> None:
    ffi, lib = _native._ext  # type: ignore[misc]
    assert lib.alpc_parse_attrs(ffi.NULL, 4, 0, ffi.new("alpc_attrs *")) == lib.ALPC_E_ARGS
    assert lib.alpc_parse_attrs(ffi.NULL, 0, 0, ffi.NULL) == lib.ALPC_E_ARGS
    assert lib.alpc_vm_read(os.getpid(), 0, 16, 0, ffi.NULL, 4) == lib.ALPC_E_ARGS


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="needs the built extension")
def test_socket_calls_of_the_extension(tmp_path: Path) -> None:
    from alpc.transport import Stream

    left, right = Stream.pair()
    try:
        assert _native.sock_send is not None and _native.sock_wait_recv is not None
        assert _native.recv_state is not None
        state = _native.recv_state()
        assert _native.sock_send(left.fileno(), b"hello") == 5
        # Without SO_PASSCRED a read brings no credentials.
        assert _native.sock_wait_recv(right.fileno(), -1, 1000, 4, state) == (5, b"hello", [], 0)
        # A read that must not wait skips the poll: an empty socket answers EAGAIN.
        assert _native.sock_wait_recv(right.fileno(), -1, 0, 4, state)[0] == -errno.EAGAIN
        assert _native.sock_wait_recv(right.fileno(), -1, 1, 4, state)[0] == _native.E_TIMEOUT
        # With it, every read does; the first (and any that differ) are flagged as changed.
        right.set_passcred(True)
        me = (os.getpid(), os.getuid(), os.getgid())
        assert _native.sock_send(left.fileno(), b"a") == 1
        assert _native.sock_wait_recv(right.fileno(), -1, 1000, 4, state) == (
            1, b"a", [], _native.RECV_CRED | _native.RECV_CRED_CHANGED)
        assert _native.recv_cred(state) == me
        assert _native.sock_send(left.fileno(), b"b") == 1
        assert _native.sock_wait_recv(right.fileno(), -1, 1000, 4, state) == (1, b"b", [], _native.RECV_CRED)
        # A passed fd arrives with its bytes; more than max_fds are all closed (none leaks) and flagged.
        with open(tmp_path / "f", "w") as f:
            left.send([b"x"], [f.fileno()])
            n, data, fds, flags = _native.sock_wait_recv(right.fileno(), -1, 1000, 4, state)
            assert (n, data, len(fds), flags) == (1, b"x", 1, _native.RECV_CRED)
            os.close(fds[0])
            left.send([b"y"], [f.fileno(), f.fileno()])
            assert _native.sock_wait_recv(right.fileno(), -1, 1000, 1, state) == (
                1, b"y", [], _native.RECV_CRED | _native.RECV_TRUNCATED)
            left.send([b"z"], [f.fileno()] * 8)
            assert _native.sock_wait_recv(right.fileno(), -1, 1000, 1, state) == (
                1, b"z", [], _native.RECV_CRED | _native.RECV_TRUNCATED)
        # The watched fd firing alone is reported as such.
        watch_r, watch_w = os.pipe()
        os.write(watch_w, b"!")
        assert _native.sock_wait_recv(right.fileno(), watch_r, 1000, 4, state)[0] == _native.E_WATCH
        assert _native.sock_wait_recv(right.fileno(), -1, 1000, 4, state, 0, watch_r)[0] == _native.E_WATCH
        # Data and a watched fd at once: the data is read, and the watch reported beside it.
        assert _native.sock_send(left.fileno(), b"w") == 1
        assert _native.sock_wait_recv(right.fileno(), -1, 1000, 4, state, 0, watch_r) == (
            1, b"w", [], _native.RECV_CRED | _native.RECV_WATCHED)
        os.close(watch_r)
        os.close(watch_w)
        left.close()
        assert _native.sock_wait_recv(right.fileno(), -1, 1000, 4, state) == (0, b"", [], 0)
        assert _native.sock_send(right.fileno(), b"z") == -errno.EPIPE
    finally:
        left.close()
        right.close()


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="needs the built extension")
def test_a_spinning_wait_reads_what_arrives_and_times_out_like_a_sleeping_one() -> None:
    from alpc.transport import Stream

    _ffi, lib = _native._ext  # type: ignore[misc]
    assert lib.ALPC_MAX_SPIN_US == _native.MAX_SPIN_US
    left, right = Stream.pair()
    try:
        assert _native.sock_wait_recv is not None and _native.recv_state is not None
        state = _native.recv_state()
        wait = _native.sock_wait_recv
        # Nothing comes: the spin ends, then the sleep until the timeout.
        started = time.monotonic()
        assert wait(right.fileno(), -1, 20, 4, state, 500)[0] == _native.E_TIMEOUT
        assert time.monotonic() - started >= 0.019
        # Data sent while the reader spins (another thread) is read by the spin.
        # Whether it lands during the spin or after it, the read is the same.
        sender = threading.Timer(0.0002, lambda: os.write(left.fileno(), b"spun"))
        sender.start()
        assert wait(right.fileno(), -1, 1000, 4, state, _native.MAX_SPIN_US) == (4, b"spun", [], 0)
        sender.join()
        # The watched fd is polled by the spin too.
        watch_r, watch_w = os.pipe()
        os.write(watch_w, b"!")
        assert wait(right.fileno(), watch_r, 1000, 4, state, 100)[0] == _native.E_WATCH
        os.close(watch_r)
        os.close(watch_w)
        for bad in (-1, _native.MAX_SPIN_US + 1):
            assert wait(right.fileno(), -1, 0, 4, state, bad)[0] == lib.ALPC_E_ARGS
    finally:
        left.close()
        right.close()


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="needs the built extension")
def test_the_c_epoll_wait_reports_the_set_and_the_watched_fd() -> None:
    import select

    _ffi, lib = _native._ext  # type: ignore[misc]
    assert lib.ALPC_MAX_READY == _native.MAX_READY
    wait = _native.epoll_wait
    assert wait is not None
    epoll = select.epoll()
    pipes = [os.pipe() for _ in range(3)]
    try:
        for read, _ in pipes[:2]:
            epoll.register(read, select.EPOLLIN)
        watch = pipes[2][0]
        assert wait(epoll.fileno(), watch, 1, 0) == (_native.E_TIMEOUT, [], False)
        assert wait(epoll.fileno(), -1, 20, 300)[0] == _native.E_TIMEOUT  # spun, then slept
        os.write(pipes[1][1], b"!")
        assert wait(epoll.fileno(), watch, 1000, 100) == (1, [pipes[1][0]], False)
        os.write(pipes[2][1], b"!")
        assert wait(epoll.fileno(), watch, 1000, 0) == (1, [pipes[1][0]], True)
        os.read(pipes[1][0], 1)
        assert wait(epoll.fileno(), watch, 1000, 0) == (0, [], True)  # only the watched fd
        os.write(pipes[0][1], b"!")
        os.write(pipes[1][1], b"!")
        n, ready, watched = wait(epoll.fileno(), -1, 1000, 0)
        assert (n, sorted(ready), watched) == (2, sorted([pipes[0][0], pipes[1][0]]), False)
        for bad in (-1, _native.MAX_SPIN_US + 1):
            assert wait(epoll.fileno(), -1, 0, bad)[0] == lib.ALPC_E_ARGS
        closed = os.dup(epoll.fileno())
        os.close(closed)
        assert wait(closed, -1, 0, 0)[0] == -errno.EBADF
    finally:
        epoll.close()
        for read, write in pipes:
            os.close(read)
            os.close(write)


def test_poller_wait_behaves_the_same_in_both_implementations() -> None:
    from alpc.transport import Poller, deadline_after

    poller = Poller()
    pipes = [os.pipe() for _ in range(2)]
    try:
        poller.register(pipes[0][0])
        watch = pipes[1][0]
        assert poller.wait(watch, deadline_after(0.0)) is None
        started = time.monotonic()
        assert poller.wait(watch, deadline_after(0.02), spin_us=200) is None
        assert time.monotonic() - started >= 0.019
        os.write(pipes[0][1], b"!")
        assert poller.wait(watch, None, spin_us=100) == ([pipes[0][0]], False)
        os.write(pipes[1][1], b"!")
        assert poller.wait(watch, None) == ([pipes[0][0]], True)
        os.read(pipes[0][0], 1)
        assert poller.wait(watch, deadline_after(1.0)) == ([], True)
        assert poller.wait(-1, deadline_after(0.0)) is None
    finally:
        poller.close()
        for read, write in pipes:
            os.close(read)
            os.close(write)


def test_the_spin_budget_follows_how_fast_the_peer_answers() -> None:
    from alpc.transport import SpinBudget

    budget = SpinBudget()
    # Its first wait probes (a new connection may make only a few requests) ...
    assert budget.next() == SpinBudget.MAX_US
    budget.waited(SpinBudget.MAX_US + 1)  # a slow peer: sleep at once
    # ... then, asleep, it spins once every PROBE_EVERY waits to find out.
    plan = [budget.next() for _ in range(SpinBudget.PROBE_EVERY)]
    assert plan[:-1] == [0] * (SpinBudget.PROBE_EVERY - 1) and plan[-1] == SpinBudget.MAX_US
    budget.waited(20)  # a quick peer: about twice its time
    assert budget.next() == 45
    budget.waited(0)
    assert budget.next() == 5
    budget.waited(SpinBudget.MAX_US)
    assert budget.next() == SpinBudget.MAX_US  # capped
    budget.waited(SpinBudget.MAX_US + 1)  # a slow peer: sleep at once again
    assert budget.next() == 0


def test_spin_readable_returns_what_fired_or_nothing_once_its_time_is_up() -> None:
    from alpc.transport import spin_readable

    read, write = os.pipe()
    try:
        started = time.monotonic()
        assert spin_readable([read], 300) == []
        assert time.monotonic() - started >= 0.0003
        os.write(write, b"!")
        assert spin_readable([read], 300) == [read]
    finally:
        os.close(read)
        os.close(write)


def test_stream_read_behaves_the_same_in_both_implementations(tmp_path: Path) -> None:
    from alpc.security import PeerCred
    from alpc.transport import Stream

    left, right = Stream.pair()
    watch_r, watch_w = os.pipe()
    try:
        right.watch([watch_r])
        assert right.read(0.0, 4) is False
        left.send([b"abc"])
        assert right.read(None, 4) == (b"abc", [], None, False)
        right.set_passcred(True)
        me = PeerCred(os.getpid(), os.getuid(), os.getgid())
        left.send([b"def"])
        assert right.read(None, 4) == (b"def", [], me, False)
        with open(tmp_path / "f", "w") as f:
            left.send([b"x"], [f.fileno()])
            data, fds, cred, truncated = right.read(None, 1)  # type: ignore[misc]
            assert (data, len(fds), cred, truncated) == (b"x", 1, me, False)
            os.close(fds[0])
            left.send([b"y"], [f.fileno(), f.fileno()])
            assert right.read(None, 1) == (b"y", [], me, True)
        os.write(watch_w, b"!")
        assert right.read(None, 4) is None  # only the watched fd (a pidfd, in use) fired
        # A multiplexer's read: two more fds to wake for, and whether they fired beside the data.
        other_r, other_w = os.pipe()
        try:
            assert right.read_watching(other_r, -1, time.monotonic() + 0.01, 0, 4) == (False, False)
            assert right.read_watching(other_r, watch_r, None, 50, 4) == (None, True)
            left.send([b"ghi"])
            assert right.read_watching(other_r, -1, None, 0, 4) == ((b"ghi", [], me, False), False)
            left.send([b"jkl"])
            assert right.read_watching(other_r, watch_r, None, 0, 4) == ((b"jkl", [], me, False), True)
        finally:
            os.close(other_r)
            os.close(other_w)
        left.close()
        assert right.read(None, 4) == (b"", [], None, False)
    finally:
        left.close()
        right.close()
        os.close(watch_r)
        os.close(watch_w)


def test_stream_send_writes_every_byte_of_several_buffers_in_order() -> None:
    """Small frames written together are joined (one-buffer path); large ones and a full socket
    still deliver every byte, in order, in both implementations."""
    import socket

    from alpc.transport import Stream

    left, right = Stream.pair()
    received = bytearray()
    try:
        small = [b"head", memoryview(b"body").cast("B"), bytearray(b"tail")]
        left.send(small)
        left.send([b"a" * 20_000, b"b" * 3])  # past the joining limit
        left._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # a full socket: partial writes
        big = [os.urandom(3000) for _ in range(200)]

        def send_all() -> None:
            left.send(big[:100], (), time.monotonic() + 30)  # one write of many buffers
            for index in range(100, 200, 2):  # small pairs, joined, most of them cut by the full socket
                left.send([big[index], memoryview(big[index + 1])], (), time.monotonic() + 30)

        sender = threading.Thread(target=send_all)
        sender.start()
        want = 12 + 20_003 + sum(map(len, big))
        while len(received) < want:
            got = right.read(time.monotonic() + 30, 4)
            assert got, "the sender stalled"
            received += got[0]  # type: ignore[index]
        sender.join(30)
        assert bytes(received) == b"headbodytail" + b"a" * 20_000 + b"b" * 3 + b"".join(big)
    finally:
        left.close()
        right.close()

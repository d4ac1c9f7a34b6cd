"""Bad input to the public API: a typed, prompt error naming the mistake, never a crash deep inside."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import alpc
from alpc import _native
from alpc.transport import wait_readable, wait_readable_or_hangup

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


# -- Section.open: posix_ipc crashes the whole process on a name holding a NUL ---------------


@pytest.mark.parametrize("name", ["a\0b", "/\0", "", "/", "/a/b", "x" * 300, "\ud800", 5])
def test_section_open_refuses_a_malformed_name(name: object) -> None:
    # In a child: before the fix a NUL in the name killed the process with SIGSEGV.
    code = ("import alpc\n"
            f"try:\n    alpc.Section.open({name!r})\n"
            "except alpc.SectionError as exc:\n    print('SectionError', exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, f"the process died ({done.returncode}): {done.stderr[-500:]}"
    assert done.stdout.startswith("SectionError"), done.stdout + done.stderr[-500:]


# -- timeouts: README: "one beyond ~24.8 days ... waits that long at most" -------------------------


def test_an_infinite_or_huge_timeout_waits_instead_of_overflowing(broker: alpc.Broker, config: alpc.Config,
                                                                    spawn) -> None:
    for timeout in (math.inf, 1e300):
        assert alpc.list_ports(config, timeout=timeout) == ()  # was OverflowError / struct.error
        with pytest.raises(alpc.PortNotFound):
            alpc.connect("svc.absent", timeout=timeout, config=config)
    server = spawn("server", "svc.inf")
    server.expect("READY")
    with alpc.connect("svc.inf", timeout=math.inf, config=config) as comm:
        server.expect("ACCEPTED")
        assert comm.request(b"abc", timeout=math.inf).data == b"ABC"
        assert comm.start_request(b"def", timeout=math.inf).result(math.inf).data == b"DEF"
        comm.ping(timeout=math.inf)
        # A deadline of "never" travels as the wire's largest one.
        assert comm.request(b"ghi", timeout=5, deadline=math.inf).data == b"GHI"
        with pytest.raises(ValueError, match="deadline"):
            comm.request(b"x", timeout=5, deadline=math.nan)
        assert comm.request(b"ok", timeout=5).data == b"OK"


def test_a_nan_timeout_is_refused_not_taken_for_zero(broker: alpc.Broker, config: alpc.Config) -> None:
    with alpc.create_port("svc.nan", config=config) as port:
        with pytest.raises(ValueError, match="timeout"):
            port.listen(timeout=math.nan)  # was an immediate Timeout
        with pytest.raises(ValueError, match="timeout"):
            alpc.list_ports(config, timeout=math.nan)


def test_an_infinite_deadline_does_not_kill_a_wait() -> None:
    # The port's keeper waits until last_report + report_interval: create_port(report_interval=inf)
    # made that wait raise OverflowError and the keeper thread die.
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        assert wait_readable([r], math.inf) == [r]
        assert wait_readable_or_hangup([r], [], math.inf) == [r]
        assert wait_readable([r], time.monotonic() + 1e300) == [r]
    finally:
        os.close(r)
        os.close(w)


# -- settings: refused where they are made, not deep in the first call, nor at the broker ----


@pytest.mark.parametrize("value", [-1, math.nan, "5", True])
def test_config_checks_its_connect_timeout(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="connect_timeout"):
        alpc.Config(runtime_dir=tmp_path, connect_timeout=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -1, "64", True, 2**64])
def test_config_checks_its_max_connect_data(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="max_connect_data"):
        alpc.Config(runtime_dir=tmp_path, max_connect_data=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["max_connect_data", "max_pending_connects", "max_connections",
                                  "max_port_section_bytes"])
@pytest.mark.parametrize("value", [True, 2**70])
def test_port_attributes_refuse_limits_the_broker_cannot_take(name: str, value: object) -> None:
    # True made the broker drop the registration as a protocol error (BrokerUnavailable);
    # 2**70 failed in msgpack with OverflowError.
    with pytest.raises(ValueError, match=name):
        alpc.PortAttributes(**{name: value})  # type: ignore[arg-type]


def test_section_settings_fit_in_64_bits() -> None:
    with pytest.raises(ValueError, match="max_section_bytes"):
        alpc.PortAttributes(max_section_bytes=2**70)


def test_broker_limits_fit_in_what_the_broker_can_report() -> None:
    # 2**64 was accepted, and then every `alpc stats` made the broker log an internal error
    # and drop the asker.
    with pytest.raises(ValueError, match="max_connections_per_uid"):
        alpc.BrokerLimits(max_connections_per_uid=2**64)
    with pytest.raises(ValueError, match="max_ports_per_uid"):
        alpc.BrokerLimits(max_ports_per_uid=2**64)


@pytest.mark.skipif(_native.IMPLEMENTATION != "c", reason="cffi's OverflowError: the C extension only")
@pytest.mark.parametrize(("slots", "slot_size"), [(2**70, 512), (8, -64), (-8, 512), (8, 2**40)])
def test_quick_geometry_out_of_range_is_a_value_error(slots: int, slot_size: int) -> None:
    with pytest.raises(ValueError, match="quick_slots"):
        alpc.PortAttributes(quick_slots=slots, quick_slot_size=slot_size)


# -- sizes and offsets of sections and views ---------------------------------------------------


def test_section_sizes_and_offsets_must_be_ints() -> None:
    with pytest.raises(alpc.SectionError):
        alpc.Section.create(1.5)  # type: ignore[arg-type]
    with alpc.Section.create(4096) as section:
        for offset, length in ((0.5, 10), (0, 10.0), ("0", 10)):
            with pytest.raises(alpc.SectionError):
                section.view(offset, length)  # type: ignore[arg-type]


def test_create_view_of_a_float_size_is_a_section_error(broker: alpc.Broker, config: alpc.Config, spawn) -> None:
    server = spawn("server", "svc.views")
    server.expect("READY")
    with alpc.connect("svc.views", timeout=10, config=config) as comm:
        with pytest.raises(alpc.SectionError, match="positive size"):
            comm.create_view(1.5)  # type: ignore[arg-type]  # was AttributeError: 'float' ... 'bit_length'
        assert comm.request(b"still fine", timeout=10).data == b"STILL FINE"

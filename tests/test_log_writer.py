"""The broker's log writer: a stderr that takes no lines never blocks a caller, and loses nothing silently."""

from __future__ import annotations

import logging
import os
import select

import pytest

from alpc.logs import LogWriter, StructuredFormatter, fields

pytestmark = pytest.mark.timeout(60)


def test_lines_a_full_stderr_cannot_take_are_dropped_counted_and_reported() -> None:
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        while True:  # full, as a stderr nobody reads ends up
            try:
                os.write(w, b"." * 65536)
            except BlockingIOError:
                break
        writer = LogWriter(w, max_lines=3)
        writer.setFormatter(StructuredFormatter())
        logger = logging.getLogger("alpc.test_log_writer")
        logger.propagate = False
        logger.addHandler(writer)
        try:
            for index in range(10):  # none of these may wait for the pipe
                logger.warning("line %d", index, extra=fields(port="svc.full"))
            assert writer.dropped_total >= 4  # at most 3 queued and 3 taken before the writer blocked
            dropped = writer.dropped_total
            out = b""
            while b"log lines dropped" not in out:  # the reader is back: queued lines, then the count
                assert select.select([r], [], [], 20)[0], out[-500:]
                out += os.read(r, 65536)
            writer.flush()
            out += os.read(r, 65536) if select.select([r], [], [], 0)[0] else b""
        finally:
            logger.removeHandler(writer)
            writer.close()
        lines = out.lstrip(b".").decode().splitlines()
        written = [line for line in lines if " line " in line]
        assert len(written) == 10 - dropped and all("port=svc.full" in line for line in written), lines
        assert lines[-1].endswith(f"alpc.logs: {dropped} log lines dropped: nobody read them in time"), lines
    finally:
        os.close(r)
        os.close(w)

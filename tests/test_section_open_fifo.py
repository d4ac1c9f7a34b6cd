"""``Section.open`` of a name that is a FIFO fails at once, typed; it never hangs.

/dev/shm is writable by every user, so anyone can make a FIFO under a name a process is about to
open (a name another peer handed it, a creator's name after it died). shm_open() is a plain
open() there: on a FIFO it waits for a writer, forever, and posix_ipc waits holding the GIL, so
every thread of the process stops (the project's promise: never a hang, bad input a typed
error, as a directory there already is: tests/test_section_open_names.py). The open runs in a
child process, which a hang cannot take the test run down with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.timeout(60)

BOUND = 20.0  # seconds: an open that has not returned by then is hung

OPEN = """
import sys, alpc
try:
    alpc.Section.open(sys.argv[1])
except alpc.SectionError as exc:
    print("SectionError:", exc)
else:
    print("opened")
"""


@pytest.fixture
def shm_fifo() -> Iterator[str]:
    """A FIFO in /dev/shm under this session's prefix (so no other run sees it)."""
    name = f"{os.environ['ALPC_SHM_PREFIX']}fifo-{os.getpid()}"
    path = f"/dev/shm/{name}"
    os.mkfifo(path, 0o600)
    try:
        yield name
    finally:
        os.unlink(path)


def test_a_fifo_in_dev_shm_is_not_a_section_and_does_not_hang_the_open(shm_fifo: str) -> None:
    try:
        done = subprocess.run([sys.executable, "-c", OPEN, shm_fifo], capture_output=True, text=True,
                              timeout=BOUND, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("Section.open of a FIFO hung (the child was killed)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("SectionError:") and "not a section" in done.stdout, done.stdout

"""README, API: "a section name that is not one segment of 1..255 bytes without NUL, raises
SectionError", and bad input fails at once with a typed error naming it. `Section.open` of a
name that is no section at all (`.`, `..`, a directory someone made in /dev/shm) raised a bare
OSError (ENODEV, from mmap) or posix_ipc's untyped ValueError("Invalid parameter(s)")."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import alpc

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def shm_directory() -> Iterator[str]:
    """A directory in /dev/shm under this session's prefix (so no other run sees it)."""
    name = f"{os.environ['ALPC_SHM_PREFIX']}shm-dir"
    path = Path("/dev/shm") / name
    path.mkdir()
    try:
        yield name
    finally:
        path.rmdir()


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize("name", [".", "..", "/.", "/.."])
def test_dot_names_are_not_sections(name: str, writable: bool) -> None:
    with pytest.raises(alpc.SectionError, match="section"):
        alpc.Section.open(name, writable=writable)


@pytest.mark.parametrize("writable", [False, True])
def test_a_directory_in_dev_shm_is_not_a_section(shm_directory: str, writable: bool) -> None:
    for name in (shm_directory, "/" + shm_directory):
        with pytest.raises(alpc.SectionError, match="not a section"):
            alpc.Section.open(name, writable=writable)


def test_a_real_named_section_still_opens() -> None:
    section = alpc.Section.create(4096, backend="posix", named=True)
    try:
        assert section.name is not None
        other = alpc.Section.open(section.name, writable=True)
        section.unlink()
        with other.view(0, 3) as memory:
            assert len(memory) == 3
        other.close()
    finally:
        section.close()

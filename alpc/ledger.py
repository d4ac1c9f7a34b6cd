"""Sans-IO bookkeeping of shared sections: which ranges are lent, what a peer may refer to.

Each side of a connection owns the sections it writes. The sender's
``OutboundLedger`` decides where a message goes (a free range of a pooled
section, a new section, or nowhere yet: wait), and takes ranges back when the
receiver releases them. The receiver's ``InboundLedger`` checks every reference
a peer sends against the sections that peer announced: unknown ids, ranges
outside a section, ranges overlapping one still held, and releases of ranges
never lent are all protocol errors. No memory, fds or sockets here; the
section module and the drivers do the I/O.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

from . import _native
from .errors import MessageTooLarge, ProtocolError
from .wire import Release, SectionFlag, SectionNew, SectionRef

__all__ = [
    "ALIGN",
    "PAGE",
    "Budget",
    "Grow",
    "InboundLedger",
    "OutboundLedger",
    "RangeAllocator",
    "Slot",
    "round_up",
]

# Ranges start on cache-line boundaries so concurrent writers never share a line.
ALIGN = 64
PAGE = 4096
_ID_MASK = 0xFFFFFFFF
# A plain int: testing an int against a Flag member runs enum code on every message.
_SECURE = int(SectionFlag.SECURE)


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


class RangeAllocator:
    """First-fit allocation of aligned ranges in [0, size), coalescing on free."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._starts: list[int] = [0]  # sorted starts of the free ranges
        self._free: dict[int, int] = {0: size}  # start -> length

    @property
    def idle(self) -> bool:
        return self.used == 0

    def allocate(self, length: int) -> int | None:
        need = round_up(length, ALIGN)
        for index, start in enumerate(self._starts):
            have = self._free[start]
            if have < need:
                continue
            del self._free[start]
            if have == need:
                del self._starts[index]
            else:
                self._starts[index] = start + need
                self._free[start + need] = have - need
            self.used += need
            return start
        return None

    def free(self, start: int, length: int) -> None:
        """Give back a range returned by allocate (the caller checked it was lent)."""
        size = round_up(length, ALIGN)
        self.used -= size
        index = bisect.bisect_left(self._starts, start)
        if index < len(self._starts) and start + size == self._starts[index]:
            following = self._starts.pop(index)
            size += self._free.pop(following)
        if index > 0:
            before = self._starts[index - 1]
            if before + self._free[before] == start:
                self._free[before] += size
                return
        self._starts.insert(index, start)
        self._free[start] = size


class Budget:
    """Section bytes shared by several connections (a port's max_port_section_bytes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.used -= size

    def available(self) -> int:
        with self._lock:
            return self.limit - self.used


class Slot(NamedTuple):
    """A range reserved for one message: where it is and what the peer needs to know."""

    section_id: int
    offset: int
    length: int
    secure: bool


class Grow(NamedTuple):
    """The ledger needs a new section before it can place the message.

    ``retire`` lists idle sections dropped to make room under the quota; the
    caller unmaps them and tells the peer (SECTION_CLOSE).
    """

    section_id: int
    size: int
    secure: bool
    retire: tuple[int, ...]


@dataclass
class _Outbound:
    size: int
    secure: bool
    allocator: RangeAllocator
    announced: bool = False
    lent: dict[int, tuple[int, bool]] = field(default_factory=dict)  # offset -> (length, sent)


class OutboundLedger:
    """The sender's view of its sections for one connection.

    ``quota`` is the most section memory this side may lend the peer (the
    smaller of its own limit and what the peer announced it will map).
    """

    def __init__(self, *, quota: int, section_size: int, budget: Budget | None = None) -> None:
        self.quota = quota
        self.section_size = section_size
        self.total = 0
        self._budget = budget
        self._sections: dict[int, _Outbound] = {}
        self._next_id = 1
        self._pending_grow: Grow | None = None
        self._retired: list[int] = []
        # Retired sections the peer never mapped (never announced), until ``peer_knows`` says so.
        self._unannounced: set[int] = set()
        self.budget_blocked = False
        # Ranges sent and not yet released: each may bring a RELEASE frame back.
        self.unreleased = 0

    @property
    def section_ids(self) -> list[int]:
        return list(self._sections)

    def lent_bytes(self) -> int:
        """Bytes of our sections reserved or sent and not yet released by the peer.

        Safe from a thread other than the connection's reader (the port's status
        report): the C-level copies cannot see a dict change size mid-iteration.
        """
        return sum(length for s in tuple(self._sections.values()) for length, _ in tuple(s.lent.values()))

    # -- placing ------------------------------------------------------------------

    def place_known(self, length: int) -> Slot | None:
        """A range for ``length`` bytes in a pooled section the peer maps already, counted as
        sent (its frame goes out under the same locks, or ``unsend`` and ``cancel`` undo it);
        None when that takes more (a growth, a section to announce): use ``place``."""
        for section_id, section in self._sections.items():
            if section.secure or not section.announced:
                continue
            offset = section.allocator.allocate(length)
            if offset is not None:
                section.lent[offset] = (length, True)
                self.unreleased += 1
                self.budget_blocked = False
                return Slot(section_id, offset, length, False)
        return None

    def place(self, length: int, secure: bool) -> Slot | Grow | None:
        """Where a message of ``length`` bytes goes; None means wait for releases.

        Raises MessageTooLarge when it could never fit, however much is released.
        """
        if length <= 0:
            raise ValueError("a section message needs at least one byte")
        need = round_up(length, PAGE)
        ceiling = self.quota if self._budget is None else min(self.quota, self._budget.limit)
        if need > ceiling:
            raise MessageTooLarge(
                f"a message of {length} bytes cannot fit the connection's section quota of {ceiling} bytes"
            )
        self.budget_blocked = False
        if not secure:
            for section_id, section in self._sections.items():
                if section.secure:
                    continue
                offset = section.allocator.allocate(length)
                if offset is not None:
                    section.lent[offset] = (length, False)
                    return Slot(section_id, offset, length, False)
        return self._plan_growth(length, secure)

    def _plan_growth(self, length: int, secure: bool) -> Grow | None:
        desired = round_up(length, PAGE) if secure else self._grow_size(length)
        minimum = round_up(length, PAGE)
        idle = sorted(((s.size, sid) for sid, s in self._sections.items() if not s.secure and s.allocator.idle),
                      reverse=True)
        reclaimable = sum(size for size, _ in idle)
        room = self.quota - self.total
        budget_room = room if self._budget is None else self._budget.available()
        if minimum > min(room, budget_room) + reclaimable:
            # Only releases (ours) or other connections' retirements (the port's) can help.
            self.budget_blocked = minimum <= room + reclaimable
            return None
        size = max(minimum, min(desired, min(room, budget_room) + reclaimable))
        retire: list[int] = []
        for idle_size, section_id in idle:
            if size <= min(room, budget_room):
                break
            retire.append(section_id)
            self._retire(section_id)
            room += idle_size
            budget_room += idle_size
        if self._budget is not None and not self._budget.take(size):
            self.budget_blocked = True  # another connection took it meanwhile
            self._retired.extend(retire)
            return None
        plan = Grow(self._new_id(), size, secure, tuple(retire))
        self._pending_grow = plan
        return plan

    def _grow_size(self, length: int) -> int:
        # Powers of two keep a pool of mixed sizes reusable; at least section_size.
        size = max(self.section_size, 1 << (max(length, 1) - 1).bit_length())
        return round_up(size, PAGE)

    def _new_id(self) -> int:
        section_id = self._next_id
        while section_id in self._sections or section_id == 0:
            section_id = (section_id + 1) & _ID_MASK
        self._next_id = (section_id + 1) & _ID_MASK or 1
        return section_id

    def commit(self, plan: Grow) -> None:
        """The section of ``plan`` exists now; count it."""
        if self._pending_grow != plan:
            raise ValueError("commit of a growth plan that is not pending")
        self._pending_grow = None
        self._sections[plan.section_id] = _Outbound(plan.size, plan.secure, RangeAllocator(plan.size))
        self.total += plan.size

    def abandon(self, plan: Grow) -> None:
        """Creating the section of ``plan`` failed."""
        if self._pending_grow == plan:
            self._pending_grow = None
            if self._budget is not None:
                self._budget.give(plan.size)

    def take_retired(self) -> list[int]:
        """Sections retired without a growth plan to report them; the caller unmaps them and
        tells the peer of those it knows (``peer_knows``)."""
        retired, self._retired = self._retired, []
        return retired

    def peer_knows(self, retired: list[int]) -> list[int]:
        """Of sections just retired (``retire_idle``, ``Grow.retire``, ``take_retired``), those
        the peer maps, for its SECTION_CLOSE. A section reserved for views released unsent was
        never announced: a close naming it is a protocol error, and the peer drops the connection."""
        known = [section_id for section_id in retired if section_id not in self._unannounced]
        self._unannounced.difference_update(retired)
        return known

    def allocate_in(self, section_id: int, length: int) -> Slot:
        """Place a message in the section just committed for it."""
        section = self._sections[section_id]
        offset = section.allocator.allocate(length)
        if offset is None:
            raise ValueError(f"section {section_id} cannot hold {length} bytes")
        section.lent[offset] = (length, False)
        return Slot(section_id, offset, length, section.secure)

    # -- announcing and sending ------------------------------------------------------

    def needs_announce(self, section_id: int) -> bool:
        return not self._sections[section_id].announced

    def set_announced(self, section_id: int, announced: bool) -> None:
        section = self._sections.get(section_id)
        if section is not None:
            section.announced = announced

    def mark_sent(self, slot: Slot) -> None:
        section = self._sections[slot.section_id]
        section.lent[slot.offset] = (slot.length, True)
        self.unreleased += 1

    def unsend(self, slot: Slot) -> None:
        """The frame that carried ``slot`` never left: the peer does not hold it."""
        section = self._sections.get(slot.section_id)
        if section is not None and section.lent.get(slot.offset, (0, False))[1]:
            section.lent[slot.offset] = (slot.length, False)
            self.unreleased -= 1

    def cancel(self, slot: Slot) -> bool:
        """Take back a range that was never sent; True if its section is gone too."""
        section = self._sections.get(slot.section_id)
        if section is None or section.lent.get(slot.offset, (0, True))[1]:
            return False
        del section.lent[slot.offset]
        section.allocator.free(slot.offset, slot.length)
        if section.secure:
            self._drop(slot.section_id)
            return True
        return False

    # -- the peer gives ranges back ------------------------------------------------------

    def release(self, entry: Release) -> bool:
        """The peer released a range; True when that removed a one-shot section.

        A release of a range this side never lent (or not yet sent) is a
        protocol error: a peer must not free what it does not hold.
        """
        section = self._sections.get(entry.section_id)
        if section is None:
            raise ProtocolError(f"release in unknown section {entry.section_id}")
        lent = section.lent.get(entry.offset)
        if lent is None or not lent[1] or lent[0] != entry.length:
            raise ProtocolError(f"release of a range never lent: section {entry.section_id} "
                                f"offset {entry.offset} length {entry.length}")
        del section.lent[entry.offset]
        section.allocator.free(entry.offset, entry.length)
        self.unreleased -= 1
        if section.secure:
            self._drop(entry.section_id)
            return True
        return False

    def _drop(self, section_id: int) -> None:
        section = self._sections.pop(section_id)
        self.total -= section.size
        if self._budget is not None:
            self._budget.give(section.size)

    def _retire(self, section_id: int) -> None:
        if not self._sections[section_id].announced:
            self._unannounced.add(section_id)
        self._drop(section_id)

    def retire_idle(self) -> list[int]:
        """Drop every idle pooled section (to give memory back); returns their ids."""
        idle = [sid for sid, s in self._sections.items() if not s.secure and s.allocator.idle]
        for section_id in idle:
            self._retire(section_id)
        return idle

    def clear(self) -> None:
        for section_id in list(self._sections):
            self._drop(section_id)
        self.unreleased = 0
        self._unannounced.clear()


@dataclass
class _Inbound:
    size: int
    secure: bool
    starts: list[int] = field(default_factory=list)  # sorted starts of the ranges held
    held: dict[int, int] = field(default_factory=dict)  # start -> length
    used: bool = False


class InboundLedger:
    """The receiver's view of the sections one peer lent it.

    ``quota`` bounds the bytes of peer sections this side maps; ``max_length``
    bounds one message. ``require_secure`` refuses references that are not
    write-sealed (a port with secure views).
    """

    def __init__(self, *, quota: int, max_length: int, require_secure: bool = False) -> None:
        self.quota = quota
        self.max_length = max_length
        self.require_secure = require_secure
        self.mapped = 0
        self._sections: dict[int, _Inbound] = {}

    @property
    def section_ids(self) -> list[int]:
        return list(self._sections)

    def held_bytes(self) -> int:
        """Bytes of the peer's sections this side still holds (messages and views not yet released).

        Safe from another thread, as ``OutboundLedger.lent_bytes``.
        """
        return sum(length for s in tuple(self._sections.values()) for length in tuple(s.held.values()))

    def add(self, new: SectionNew) -> None:
        if new.section_id in self._sections:
            raise ProtocolError(f"section {new.section_id} announced twice")
        if new.size <= 0:
            raise ProtocolError(f"section {new.section_id} announced with size {new.size}")
        if self.mapped + new.size > self.quota:
            raise ProtocolError(f"section {new.section_id} of {new.size} bytes exceeds the "
                                f"{self.quota}-byte section quota ({self.mapped} mapped)")
        self._sections[new.section_id] = _Inbound(new.size, bool(new.flags & _SECURE))
        self.mapped += new.size

    def forget(self, section_id: int) -> None:
        """Undo add() when mapping the announced section failed."""
        section = self._sections.pop(section_id, None)
        if section is not None:
            self.mapped -= section.size

    def take(self, ref: SectionRef) -> None:
        """Check a peer's reference and hold its range until released."""
        section = self._sections.get(ref.section_id)
        if section is None:
            raise ProtocolError(f"reference to unknown section {ref.section_id}")
        if not _native.check_range(ref.offset, ref.length, section.size, self.max_length):
            raise ProtocolError(f"reference [{ref.offset}, +{ref.length}) outside section {ref.section_id} "
                                f"of {section.size} bytes (or longer than {self.max_length})")
        if bool(ref.flags & _SECURE) != section.secure:
            raise ProtocolError(f"reference and section {ref.section_id} disagree on being secure")
        if self.require_secure and not section.secure:
            raise ProtocolError("this port accepts only secure (write-sealed) sections")
        if section.secure and section.used:
            raise ProtocolError(f"one-shot section {ref.section_id} referenced twice")
        index = bisect.bisect_left(section.starts, ref.offset)
        if index > 0:
            before = section.starts[index - 1]
            if before + section.held[before] > ref.offset:
                raise ProtocolError(f"reference overlaps a range of section {ref.section_id} still held")
        if index < len(section.starts) and section.starts[index] < ref.offset + ref.length:
            raise ProtocolError(f"reference overlaps a range of section {ref.section_id} still held")
        section.starts.insert(index, ref.offset)
        section.held[ref.offset] = ref.length
        section.used = True

    def release(self, section_id: int, offset: int) -> tuple[Release, bool]:
        """Our side is done with a range; returns the entry to send and whether
        the section (a one-shot) is finished and should be unmapped."""
        section = self._sections[section_id]
        length = section.held.pop(offset)
        section.starts.remove(offset)
        if section.secure:
            self.forget(section_id)
            return Release(section_id, offset, length), True
        return Release(section_id, offset, length), False

    def close(self, section_id: int) -> None:
        """The peer retired a pooled section; it must hold nothing of ours."""
        section = self._sections.get(section_id)
        if section is None:
            raise ProtocolError(f"close of unknown section {section_id}")
        if section.secure:
            raise ProtocolError(f"close of one-shot section {section_id}")
        if section.held:
            raise ProtocolError(f"close of section {section_id} while {len(section.held)} ranges are held")
        self.forget(section_id)

    def clear(self) -> None:
        self._sections.clear()
        self.mapped = 0

"""Sans-IO section bookkeeping: the allocator, the sender's lending, the receiver's checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpc.errors import MessageTooLarge, ProtocolError
from alpc.ledger import ALIGN, PAGE, Budget, Grow, InboundLedger, OutboundLedger, RangeAllocator, Slot
from alpc.wire import Release, SectionFlag, SectionNew, SectionRef

MIB = 1 << 20


# -- RangeAllocator -------------------------------------------------------------------


def test_allocator_first_fit_aligned_and_coalescing() -> None:
    allocator = RangeAllocator(4096)
    first = allocator.allocate(1)
    second = allocator.allocate(100)
    assert (first, second) == (0, ALIGN)
    assert allocator.allocate(4096) is None
    allocator.free(first, 1)
    allocator.free(second, 100)
    assert allocator.idle
    assert allocator.allocate(4096) == 0  # the pieces merged back into one


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3000)), max_size=60))
def test_allocator_never_hands_out_overlapping_ranges(steps: list[tuple[bool, int]]) -> None:
    allocator = RangeAllocator(16 * 1024)
    held: dict[int, int] = {}
    for free_one, length in steps:
        if free_one and held:
            start = sorted(held)[length % len(held)]
            allocator.free(start, held.pop(start))
            continue
        start = allocator.allocate(length)
        if start is None:
            continue
        assert start % ALIGN == 0 and start + length <= allocator.size
        for other, other_length in held.items():
            assert start + length <= other or other + other_length <= start
        held[start] = length
    for start, length in list(held.items()):
        allocator.free(start, length)
    assert allocator.idle and allocator.allocate(allocator.size) == 0


# -- OutboundLedger ------------------------------------------------------------------


def grow(ledger: OutboundLedger, length: int, secure: bool = False) -> Slot:
    placed = ledger.place(length, secure)
    assert isinstance(placed, Grow)
    ledger.commit(placed)
    return ledger.allocate_in(placed.section_id, length)


def test_pool_grows_once_then_reuses() -> None:
    ledger = OutboundLedger(quota=64 * MIB, section_size=2 * MIB)
    slot = grow(ledger, 1000)
    ledger.mark_sent(slot)
    ledger.release(Release(slot.section_id, slot.offset, slot.length))
    for _ in range(100):
        again = ledger.place(1000, False)
        assert isinstance(again, Slot) and again.section_id == slot.section_id
        ledger.mark_sent(again)
        ledger.release(Release(again.section_id, again.offset, again.length))
    assert ledger.section_ids == [slot.section_id] and ledger.total == 2 * MIB


def test_sections_grow_to_a_power_of_two_within_the_quota() -> None:
    ledger = OutboundLedger(quota=38 * MIB, section_size=2 * MIB)
    placed = ledger.place(17 * MIB, False)
    assert isinstance(placed, Grow) and placed.size == 32 * MIB
    ledger.commit(placed)
    ledger.allocate_in(placed.section_id, 17 * MIB)
    assert isinstance(ledger.place(15 * MIB, False), Slot)  # the rest of the same section
    # 6 MiB of quota left: the next section shrinks to fit rather than wait.
    placed = ledger.place(5 * MIB, False)
    assert isinstance(placed, Grow) and placed.size == 6 * MIB


def test_full_quota_means_wait_and_too_big_means_never() -> None:
    ledger = OutboundLedger(quota=4 * MIB, section_size=4 * MIB)
    slot = grow(ledger, 3 * MIB)
    ledger.mark_sent(slot)
    assert ledger.place(2 * MIB, False) is None
    with pytest.raises(MessageTooLarge, match="quota"):
        ledger.place(5 * MIB, False)
    ledger.release(Release(slot.section_id, slot.offset, slot.length))
    assert isinstance(ledger.place(2 * MIB, False), Slot)


def test_idle_sections_are_retired_to_make_room() -> None:
    ledger = OutboundLedger(quota=10 * MIB, section_size=4 * MIB)
    small = grow(ledger, 100)
    busy = ledger.place(4 * MIB, False)  # does not fit beside it: a second section
    assert isinstance(busy, Grow)
    ledger.commit(busy)
    ledger.allocate_in(busy.section_id, 4 * MIB)
    ledger.mark_sent(small)
    ledger.release(Release(small.section_id, small.offset, small.length))
    placed = ledger.place(6 * MIB, False)
    assert isinstance(placed, Grow) and placed.retire == (small.section_id,) and placed.size == 6 * MIB
    assert ledger.section_ids == [busy.section_id]


def test_the_peer_hears_only_of_retired_sections_it_was_told_of() -> None:
    """A section whose only range was cancelled (a view released unsent) was never announced:
    retiring it (an idle trim, or a growth making room) must not name it to the peer, for
    whom a close of an unknown section is a protocol error."""
    ledger = OutboundLedger(quota=10 * MIB, section_size=4 * MIB)
    told = grow(ledger, 100)
    ledger.set_announced(told.section_id, True)
    ledger.mark_sent(told)
    silent = ledger.place(4 * MIB, False)  # does not fit beside it: a second section, never announced
    assert isinstance(silent, Grow)
    ledger.commit(silent)
    assert ledger.cancel(ledger.allocate_in(silent.section_id, 4 * MIB)) is False
    ledger.release(Release(told.section_id, told.offset, told.length))
    retired = ledger.retire_idle()
    assert sorted(retired) == [told.section_id, silent.section_id]
    assert ledger.peer_knows(retired) == [told.section_id]
    # Through a growth too.
    unsent = grow(ledger, 4 * MIB)
    ledger.cancel(unsent)
    placed = ledger.place(8 * MIB, False)
    assert isinstance(placed, Grow) and placed.retire == (unsent.section_id,)
    assert ledger.peer_knows(list(placed.retire)) == []


def test_release_of_a_range_never_lent_is_a_protocol_error() -> None:
    ledger = OutboundLedger(quota=8 * MIB, section_size=4 * MIB)
    slot = grow(ledger, 100)
    with pytest.raises(ProtocolError, match="never lent"):  # reserved but not sent yet
        ledger.release(Release(slot.section_id, slot.offset, slot.length))
    ledger.mark_sent(slot)
    with pytest.raises(ProtocolError, match="never lent"):
        ledger.release(Release(slot.section_id, slot.offset, slot.length + 1))
    with pytest.raises(ProtocolError, match="unknown section"):
        ledger.release(Release(99, 0, 1))
    ledger.release(Release(slot.section_id, slot.offset, slot.length))
    with pytest.raises(ProtocolError, match="never lent"):  # twice
        ledger.release(Release(slot.section_id, slot.offset, slot.length))


def test_secure_messages_get_their_own_one_shot_sections() -> None:
    ledger = OutboundLedger(quota=8 * MIB, section_size=4 * MIB)
    first = grow(ledger, 100, secure=True)
    second = grow(ledger, 100, secure=True)
    assert first.section_id != second.section_id and ledger.total == 2 * PAGE
    ledger.mark_sent(first)
    assert ledger.release(Release(first.section_id, first.offset, first.length)) is True
    assert ledger.total == PAGE


def test_port_budget_is_shared_between_connections() -> None:
    budget = Budget(6 * MIB)
    one = OutboundLedger(quota=8 * MIB, section_size=4 * MIB, budget=budget)
    two = OutboundLedger(quota=8 * MIB, section_size=4 * MIB, budget=budget)
    grow(one, 4 * MIB)
    placed = two.place(1 * MIB, False)
    assert isinstance(placed, Grow) and placed.size == 2 * MIB  # what the budget has left
    two.commit(placed)
    assert two.place(1 * MIB, False) is not None  # room inside its own section
    assert two.place(2 * MIB, False) is None and two.budget_blocked
    one.clear()
    assert budget.used == 2 * MIB


def test_unsent_ranges_can_be_cancelled_but_not_sent_ones() -> None:
    ledger = OutboundLedger(quota=8 * MIB, section_size=4 * MIB)
    slot = grow(ledger, 100)
    ledger.mark_sent(slot)
    assert ledger.cancel(slot) is False and ledger.lent_bytes() == 100
    ledger.unsend(slot)
    ledger.cancel(slot)
    assert ledger.lent_bytes() == 0


# -- InboundLedger ---------------------------------------------------------------------


def inbound(quota: int = 16 * MIB, require_secure: bool = False) -> InboundLedger:
    ledger = InboundLedger(quota=quota, max_length=8 * MIB, require_secure=require_secure)
    ledger.add(SectionNew(1, 0, 4 * MIB))
    return ledger


@pytest.mark.parametrize(("ref", "why"), [
    (SectionRef(2, 0, 0, 10), "unknown section"),
    (SectionRef(1, 0, 4 * MIB - 5, 10), "outside"),
    (SectionRef(1, 0, 4 * MIB + 1, 0), "outside"),
    (SectionRef(1, 0, 0, 0), "outside"),
    (SectionRef(1, 0, (1 << 64) - 1, 2), "outside"),
    (SectionRef(1, int(SectionFlag.SECURE), 0, 10), "secure"),
])
def test_bad_references_are_protocol_errors(ref: SectionRef, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        inbound().take(ref)


def test_overlapping_references_are_refused_until_released() -> None:
    ledger = inbound()
    ledger.take(SectionRef(1, 0, 100, 100))
    for offset, length in ((50, 51), (150, 10), (199, 5), (0, 4096)):
        with pytest.raises(ProtocolError, match="overlaps"):
            ledger.take(SectionRef(1, 0, offset, length))
    ledger.take(SectionRef(1, 0, 0, 100))  # adjacent ranges are fine
    ledger.take(SectionRef(1, 0, 200, 100))
    assert ledger.held_bytes() == 300
    entry, finished = ledger.release(1, 100)
    assert entry == Release(1, 100, 100) and not finished
    assert ledger.held_bytes() == 200
    ledger.take(SectionRef(1, 0, 150, 10))
    assert ledger.held_bytes() == 210


def test_mapping_quota_duplicates_and_close() -> None:
    ledger = inbound(quota=6 * MIB)
    with pytest.raises(ProtocolError, match="quota"):
        ledger.add(SectionNew(2, 0, 3 * MIB))
    with pytest.raises(ProtocolError, match="twice"):
        ledger.add(SectionNew(1, 0, MIB))
    ledger.take(SectionRef(1, 0, 0, 10))
    with pytest.raises(ProtocolError, match="held"):
        ledger.close(1)
    ledger.release(1, 0)
    ledger.close(1)
    ledger.add(SectionNew(2, 0, 6 * MIB))


def test_one_shot_sections_are_used_once_and_finish_on_release() -> None:
    ledger = inbound()
    ledger.add(SectionNew(7, int(SectionFlag.SECURE), PAGE))
    secure_ref = SectionRef(7, int(SectionFlag.SECURE), 0, 100)
    ledger.take(secure_ref)
    with pytest.raises(ProtocolError):
        ledger.take(SectionRef(7, int(SectionFlag.SECURE), 200, 100))
    assert ledger.release(7, 0) == (Release(7, 0, 100), True)
    assert 7 not in ledger.section_ids


def test_a_secure_port_refuses_plain_sections() -> None:
    with pytest.raises(ProtocolError, match="secure"):
        inbound(require_secure=True).take(SectionRef(1, 0, 0, 10))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 2000)), max_size=40))
def test_inbound_never_accepts_overlap_or_out_of_range(refs: list[tuple[int, int]]) -> None:
    ledger = InboundLedger(quota=1 << 20, max_length=4096)
    ledger.add(SectionNew(1, 0, 4096))
    held: list[tuple[int, int]] = []
    for offset, length in refs:
        try:
            ledger.take(SectionRef(1, 0, offset, length))
        except ProtocolError:
            continue
        assert 0 < length and offset + length <= 4096
        assert all(offset + length <= a or a + b <= offset for a, b in held)
        held.append((offset, length))

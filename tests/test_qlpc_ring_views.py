"""The C calls behind views in the bulk areas, on a pair of rings in one process: lending a
side's area, posting a body in place, taking it as a view (held until released) or copying
it, and what a peer's words and entries can and cannot do to that."""

from __future__ import annotations

import itertools
import mmap
import struct
from collections.abc import Iterator

import pytest
from qlpc_harness import BULK, BULK_SIZE, CLIENT_SIDE, ID_BIT, REQUEST, SERVER_SIDE, Pair, deadline, make_pair, native

from alpc._native import Q_BUSY, Q_E_ARGS, Q_E_VIEW, Q_FULL, Q_LARGE, Q_TIMEOUT

pytestmark = [native, pytest.mark.timeout(30)]

VIEW = 32  # an entry's kind flag, with BULK: its body was written in place
BULK_HELD = 28  # a side's word: it holds a view of the peer's bulk area
LOANS = itertools.count(1)  # loan numbers: the caller names each loan


@pytest.fixture
def pair() -> Iterator[Pair]:
    with make_pair(slots=4, slot_size=128) as made:
        yield made


def client_area(pair: Pair) -> int:
    return len(pair.region) - BULK_SIZE


def post_in_place(pair: Pair, body: bytes) -> int:
    """The client lends its area, writes ``body`` there and posts it in place: the status."""
    loan = next(LOANS)
    assert pair.client.lend_bulk(loan) == loan and pair.client.loan_in_force(loan)
    start = client_area(pair)
    pair.region[start:start + len(body)] = body
    status = pair.client.call(pair.client.in_place, len(body), deadline(0))
    assert pair.client.loan_in_force(loan) == (pair.client.info.posted == 0)  # a post ends the loan
    return status


def test_a_body_posted_in_place_is_taken_as_a_view_and_held_until_released(pair: Pair) -> None:
    body = b"in place" * 1000
    assert post_in_place(pair, body) == Q_TIMEOUT
    assert pair.client.info.posted == 1
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    info = pair.server.info
    assert (info.bulk, info.view, info.length, info.taken) == (1, 1, len(body), 0)
    assert pair.server.take_view() == len(body)
    assert (info.view, info.taken) == (1, 1)
    assert pair.word(SERVER_SIDE, BULK_HELD) == 1
    start = client_area(pair)
    assert pair.region[start:start + len(body)] == body  # nothing was copied: the area is the body
    # Held: the client can neither lend its area again nor copy a large body into it.
    pair.client.call_done()
    assert pair.client.lend_bulk(next(LOANS)) == Q_FULL
    assert pair.client.call(b"x" * 500, 500, deadline(0)) == Q_FULL
    assert pair.client.trim_bulk() == Q_FULL
    pair.server.release_view()
    assert pair.word(SERVER_SIDE, BULK_HELD) == 0
    loan = next(LOANS)
    assert pair.client.lend_bulk(loan) == loan
    pair.client.unlend_bulk(loan)


def test_a_lent_area_takes_no_copies_until_the_loan_ends(pair: Pair) -> None:
    loan = next(LOANS)
    assert pair.client.lend_bulk(loan) == loan
    assert pair.client.lend_bulk(next(LOANS)) == Q_FULL  # one view at a time
    assert pair.client.call(b"x" * 500, 500, deadline(0)) == Q_FULL  # would overwrite the view being filled
    assert pair.client.info.posted == 0
    assert pair.client.call(b"small", 5, deadline(0)) == Q_TIMEOUT  # a slot's body still goes
    pair.client.call_done()
    assert pair.client.trim_bulk() == Q_FULL
    pair.client.unlend_bulk(loan + 1)  # another loan's number ends nothing
    assert pair.client.loan_in_force(loan)
    pair.client.unlend_bulk(loan)
    assert not pair.client.loan_in_force(loan)
    assert pair.client.call(b"x" * 500, 500, deadline(0)) == Q_TIMEOUT


def test_a_post_in_place_needs_a_loan(pair: Pair) -> None:
    assert pair.client.call(pair.client.in_place, 100, deadline(0)) == Q_E_ARGS
    assert pair.client.info.posted == 0


def test_a_view_entry_can_be_copied_instead_and_then_holds_nothing(pair: Pair) -> None:
    """The lean calls copy every bulk entry: one written in place too, with the area free at once."""
    body = b"c" * 3000
    assert post_in_place(pair, body) == Q_TIMEOUT
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.info.view == 1
    assert pair.server.take_bulk() == len(body)
    assert pair.server.bulk_body == body and pair.server.info.view == 0
    assert pair.word(SERVER_SIDE, BULK_HELD) == 0
    pair.client.call_done()
    loan = next(LOANS)
    assert pair.client.lend_bulk(loan) == loan
    pair.client.unlend_bulk(loan)


def test_a_view_entry_while_the_last_is_held_is_a_protocol_error(pair: Pair) -> None:
    """An honest client never lends an area the server holds: a view entry then is a lie."""
    assert post_in_place(pair, b"first" * 100) == Q_TIMEOUT
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.take_view() == 500
    pair.publish_request(kind=REQUEST | BULK | VIEW, length=100, message_id=ID_BIT | 99)
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.take_view() == Q_E_VIEW
    # Copying it instead is no lie's reward either: it is only the liar's bytes.
    assert pair.server.take_bulk() == 100


def test_a_rewritten_entry_is_not_taken_as_a_view(pair: Pair) -> None:
    """The entry described was a view; rewritten as a plain bulk one before the take, it is
    not the entry described any more (Q_BUSY, nothing held)."""
    assert post_in_place(pair, b"v" * 300) == Q_TIMEOUT
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    slot = pair.client_slot(0)  # (the client's first entry)
    pair.region[slot:slot + 4] = (REQUEST | BULK).to_bytes(4, "little")
    assert pair.server.take_view() == Q_BUSY
    assert pair.word(SERVER_SIDE, BULK_HELD) == 0


def test_a_peer_that_never_releases_only_keeps_its_own_replies_off_the_area(pair: Pair) -> None:
    """The client's word says it holds the server's area (a lie, or a view kept forever): the
    server's large replies take the socket (Q_FULL), nothing waits on it."""
    pair.set_word(CLIENT_SIDE, BULK_HELD, 1)
    assert pair.server.lend_bulk(next(LOANS)) == Q_FULL
    assert pair.server.reply(ID_BIT | 5, b"r" * 500) == Q_FULL
    assert pair.server.reply(ID_BIT | 5, b"small") == 0
    pair.set_word(CLIENT_SIDE, BULK_HELD, 0)
    assert pair.server.lend_bulk(7) == 7


def test_a_loan_tells_its_own_post_from_the_next_loan(pair: Pair) -> None:
    """A view posted in place ends its loan; a loan taken right after by another thread is in
    force, and the first view's holder must not take it for its own (it once did: it sent its
    view a second time over the socket and ended the other's loan, whose post then failed)."""
    first = next(LOANS)
    assert pair.client.lend_bulk(first) == first
    assert pair.client.call(pair.client.in_place, 10, deadline(0)) == Q_TIMEOUT
    pair.client.call_done()
    assert pair.server.reply_wait(0, b"", 0, 0) == Q_LARGE
    assert pair.server.take_bulk() == 10
    second = next(LOANS)
    assert pair.client.lend_bulk(second) == second
    assert not pair.client.loan_in_force(first) and pair.client.loan_in_force(second)
    pair.client.unlend_bulk(first)  # the first view's late give-back ends nothing now
    assert pair.client.loan_in_force(second)
    pair.client.unlend_bulk(second)


def test_loan_numbers_are_the_callers_and_must_be_positive_ints(pair: Pair) -> None:
    """The caller names the loan (so a signal handler that cuts its answer off cannot lose it):
    0 and numbers past INT_MAX are refused, and the number asked for is the one in force."""
    assert pair.client.lend_bulk(0) == Q_E_ARGS
    assert pair.client.lend_bulk(2**31) == Q_E_ARGS
    assert not pair.client.loan_in_force(0)
    assert pair.client.lend_bulk(2**31 - 1) == 2**31 - 1
    assert pair.client.loan_in_force(2**31 - 1)
    pair.client.unlend_bulk(2**31 - 1)
    assert not pair.client.loan_in_force(2**31 - 1)


def test_a_client_clears_the_held_word_a_server_left_in_its_side() -> None:
    """The server lays the region out, and could leave the client's ``bulk_held`` set: the
    client would then refuse the first view reply as one "while the last is held" (Q_E_VIEW)
    and drop the connection. The client's words are its own once it maps the rings."""

    def lie(region: mmap.mmap) -> None:
        struct.pack_into("<I", region, CLIENT_SIDE + BULK_HELD, 1)

    with make_pair(slots=4, slot_size=128, before_client=lie) as pair:
        assert pair.word(CLIENT_SIDE, BULK_HELD) == 0
        loan = next(LOANS)
        assert pair.server.lend_bulk(loan) == loan  # (a held client word would say Q_FULL here)
        pair.server.unlend_bulk(loan)

"""Sans-IO quota accounting: flow-control windows, credits, and the broker's per-uid usage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpc.errors import ProtocolError
from alpc.quotas import (
    BrokerLimits,
    Flow,
    FlowLimits,
    Limit,
    UidUsage,
    WindowClosed,
    decode_credit,
    encode_credit,
)


def flows(sender: FlowLimits, receiver: FlowLimits) -> tuple[Flow, Flow]:
    """The sending side's Flow and the receiving side's, each knowing what the other announced."""
    return Flow(sender, receiver), Flow(receiver, sender)


def test_requests_wait_for_replies_past_the_peers_limit() -> None:
    out, into = flows(FlowLimits(), FlowLimits(max_pending_requests=2))
    for request_id in (1, 2):
        out.check_request()
        out.sent_request(request_id)
        into.received_request(request_id)
    with pytest.raises(WindowClosed) as closed:
        out.check_request()
    assert closed.value.limit is Limit.MAX_PENDING_REQUESTS
    into.replied(1)
    out.reply_received(1)
    out.check_request()


def test_a_peer_past_the_announced_request_limit_breaks_the_protocol() -> None:
    _, into = flows(FlowLimits(), FlowLimits(max_pending_requests=1))
    into.received_request(1)
    with pytest.raises(ProtocolError, match="max_pending_requests"):
        into.received_request(2)


def test_datagram_credits_come_back_as_the_application_takes_them() -> None:
    out, into = flows(FlowLimits(), FlowLimits(max_queued_datagrams=8))
    for _ in range(8):
        out.check_datagram()
        out.sent_datagram()
        into.received_datagram()
    with pytest.raises(WindowClosed) as closed:
        out.check_datagram()
    assert closed.value.limit is Limit.MAX_QUEUED_DATAGRAMS
    with pytest.raises(ProtocolError, match="max_queued_datagrams"):
        into.received_datagram()
    into.consumed_datagram()
    assert into.credit_owed and not into.credit_due  # batched: a quarter of the window
    into.consumed_datagram()
    assert into.credit_due
    out.credit_received(*decode_credit(encode_credit(*into.take_credit())))
    assert out.datagrams_out == 6
    out.check_datagram()


def test_fds_in_flight_are_bounded_and_returned() -> None:
    out, into = flows(FlowLimits(), FlowLimits(max_handles_per_message=4, max_inflight_handles=5))
    out.check_datagram(3)
    out.sent_datagram(3)
    into.received_datagram(3)
    with pytest.raises(WindowClosed) as closed:
        out.check_request(3)
    assert closed.value.limit is Limit.MAX_INFLIGHT_HANDLES
    with pytest.raises(WindowClosed) as never:
        out.check_request(5)
    assert never.value.limit is Limit.MAX_HANDLES_PER_MESSAGE
    with pytest.raises(ProtocolError, match="max_inflight_handles"):
        into.received_request(9, 3)
    into.consumed_datagram(3)
    assert into.credit_due  # a datagram with fds is credited at once: a sender may wait on them
    out.credit_received(*into.take_credit())
    out.check_request(4)


def test_credit_that_was_not_sent_is_kept() -> None:
    _, into = flows(FlowLimits(), FlowLimits(max_queued_datagrams=1))
    into.received_datagram(0)
    into.consumed_datagram(0)
    credit = into.take_credit()
    into.restore_credit(credit)  # the CREDIT frame could not be written
    with pytest.raises(ProtocolError):
        into.received_datagram(0)  # so the slot is still the sender's to hold
    assert into.take_credit() == credit


def test_forged_credit_is_a_protocol_error() -> None:
    out, _ = flows(FlowLimits(), FlowLimits())
    out.sent_datagram(1)
    with pytest.raises(ProtocolError, match="more than were sent"):
        out.credit_received(2, 0)
    with pytest.raises(ProtocolError, match="more than were sent"):
        out.credit_received(1, 2)
    with pytest.raises(ProtocolError, match="expected 8"):
        decode_credit(b"\0" * 7)


@pytest.mark.parametrize("kwargs", [
    {"max_pending_requests": 0}, {"max_pending_requests": 65537}, {"max_queued_datagrams": 0},
    {"max_handles_per_message": 254}, {"max_inflight_handles": -1}, {"max_pending_requests": True},
])
def test_flow_limits_are_bounded(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        FlowLimits(**kwargs)


@settings(max_examples=300)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 3), st.integers(0, 8),
       st.lists(st.tuples(st.sampled_from(["request", "datagram", "reply", "take", "credit"]), st.integers(0, 3)),
                max_size=80))
def test_an_honest_sender_never_breaks_the_receivers_limits(pending: int, window: int, per_message: int,
                                                            inflight: int, steps: list[tuple[str, int]]) -> None:
    """Whatever the interleaving, a sender that respects WindowClosed never trips the receiver."""
    receiver_limits = FlowLimits(pending, window, per_message, inflight)
    out, into = flows(FlowLimits(), receiver_limits)
    next_id = 1
    unreplied: list[int] = []
    queued: list[int] = []   # fds of datagrams the receiver's application has not taken
    for action, fds in steps:
        fds = min(fds, per_message)
        try:
            if action == "request":
                out.check_request(fds)
                out.sent_request(next_id, fds)
                into.received_request(next_id, fds)
                unreplied.append(next_id)
                next_id += 1
            elif action == "datagram":
                out.check_datagram(fds)
                out.sent_datagram(fds)
                into.received_datagram(fds)
                queued.append(fds)
        except WindowClosed:
            pass
        if action == "reply" and unreplied:
            request_id = unreplied.pop(0)
            into.replied(request_id)
            out.reply_received(request_id)
        elif action == "take" and queued:
            into.consumed_datagram(queued.pop(0))
        elif action == "credit" and into.credit_owed:
            out.credit_received(*into.take_credit())
        assert out.requests_out <= pending and out.datagrams_out <= window and out.handles_out <= inflight


def test_uid_usage_counts_and_limits() -> None:
    usage = UidUsage(BrokerLimits(max_connections_per_uid=2, max_ports_per_uid=1))
    usage.add_connection(7)
    usage.add_connection(7)
    assert not usage.may_connect(7) and usage.may_connect(8)
    usage.remove_connection(7)
    assert usage.may_connect(7)
    usage.add_port(7)
    assert not usage.may_create_port(7)
    usage.remove_port(7)
    usage.remove_connection(7)
    assert usage.uids() == []
    with pytest.raises(ValueError):
        BrokerLimits(max_ports_per_uid=0)

"""Asking the broker what runs: the clients of a port and every port's counters.

The broker answers from the figures each server's runtime reports (see
``registration``); a port is shown only to those ``security.may_inspect`` allows:
whoever its ACL admits, its owner's uid and root.
"""

from __future__ import annotations

from typing import TypeVar

from . import control
from .config import Config, config_or_default
from .errors import BrokerUnavailable
from .exchange import control_frame, read_frame
from .transport import Stream, deadline_after
from .wire import FrameDecoder, FrameLimits, MessageType

__all__ = ["latency_percentile", "list_peers", "port_stats"]

B = TypeVar("B", bound=control.Body)


def _ask(config: Config | None, request: control.Body, answer: type[B], timeout: float | None) -> B:
    config = config_or_default(config)
    limits = FrameLimits(allowed_types=frozenset({answer.TYPE, MessageType.ERROR, MessageType.SHUTDOWN}),
                         max_data=control.MAX_CONTROL_BODY)
    deadline = deadline_after(timeout)
    stream = Stream.connect(config.broker_socket, timeout)
    try:
        stream.send(control_frame(request), deadline=deadline)
        frame, _ = read_frame(stream, FrameDecoder(limits), deadline, f"the broker's {answer.__name__}")
    finally:
        stream.close()
    if frame is None or frame.type is MessageType.SHUTDOWN:
        raise BrokerUnavailable("the broker went away before answering")
    if frame.type is MessageType.ERROR:
        raise control.decode_body(frame.type, frame.data, control.ErrorReply).exception()
    return control.decode_body(frame.type, frame.data, answer)


def list_peers(name: str, config: Config | None = None, timeout: float | None = 5.0) -> control.PeerList:
    """The clients of port ``name`` as its server last reported them.

    Raises PortNotFound, or AccessDenied unless the port's ACL admits the caller
    (or it is the port's owner uid, or root).
    """
    control.validate_port_name(name)
    return _ask(config, control.Peers(name=name), control.PeerList, timeout)


def port_stats(name: str = "", config: Config | None = None, timeout: float | None = 5.0) -> control.StatsList:
    """Counters of port ``name``, or of every port the caller may inspect when ``name`` is empty."""
    # Only "" means every port: None (or any other falsy non-str) went to the broker, which
    # dropped the asking connection as a protocol error (BrokerUnavailable here).
    if name != "":
        control.validate_port_name(name)
    return _ask(config, control.Stats(name=name), control.StatsList, timeout)


def latency_percentile(histogram: tuple[int, ...], fraction: float) -> float | None:
    """The upper bound (microseconds) of the bucket holding that fraction of samples; None if empty."""
    total = sum(histogram)
    if not total:
        return None
    wanted = fraction * total
    seen = 0
    for bucket, count in enumerate(histogram):
        seen += count
        if seen >= wanted:
            return float(2**bucket) if bucket < len(histogram) - 1 else float("inf")
    return float("inf")

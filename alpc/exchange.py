"""Blocking control exchanges with the broker or a server: one frame out, one frame in.

Shared by connect(), create_port() and the broker queries, so each reads
replies the same way: exactly one frame, never a byte past it.
"""

from __future__ import annotations

import os

from . import control
from .errors import AlpcError, ProtocolError, Timeout
from .security import PeerCred
from .transport import Stream, close_fds, deadline_after, wait_readable
from .wire import Frame, FrameDecoder, FrameLimits, MessageType, encode_header

__all__ = ["control_frame", "read_frame", "refusal_after_hangup"]

_PID = os.getpid()


def _refresh_pid() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def control_frame(body: control.Body, n_fds: int = 0) -> list[bytes]:
    payload = control.encode_body(body)
    return [encode_header(body.TYPE, len(payload), n_fds=n_fds, sender_pid=_PID), payload]


def read_frame(
    stream: Stream, decoder: FrameDecoder, deadline: float | None, what: str, max_fds: int = 0,
    pidfds: list[int] | None = None,
) -> tuple[Frame | None, PeerCred | None]:
    """Read exactly one frame; returns (frame, sender credentials), or (None, _) at EOF.

    Credentials come from SCM_CREDENTIALS when the stream has SO_PASSCRED set;
    a frame assembled from two senders is refused. With ``pidfds`` (and
    SO_PASSPIDFD set) the sender's SCM_PIDFD is appended there, for the caller
    to own, whatever happens.
    """
    try:
        return _read_frame(stream, decoder, deadline, what, max_fds, pidfds)
    except BaseException:
        decoder.close_fds()  # fds of a frame that never completed: nobody else will close them
        raise


def _read_frame(stream: Stream, decoder: FrameDecoder, deadline: float | None, what: str, max_fds: int,
                pidfds: list[int] | None) -> tuple[Frame | None, PeerCred | None]:
    cred: PeerCred | None = None
    while True:
        if not wait_readable([stream.fileno()], deadline):
            raise Timeout(f"timed out waiting for {what}")
        got = stream.recv_with_ancillary(decoder.wanted(), max_fds=max_fds, want_cred=True,
                                         want_pidfd=pidfds is not None)
        if got is None:
            continue
        if got.pidfd is not None:
            if pidfds is not None and not pidfds:
                pidfds.append(got.pidfd)
            else:
                close_fds([got.pidfd])
        if not got.data:
            return None, cred
        if cred is not None and got.cred != cred:
            close_fds(got.fds)
            raise ProtocolError(f"{what} arrived from two different processes")
        cred = got.cred
        frames = decoder.feed(got.data, got.fds)
        if frames:
            return frames[0], cred


_REFUSAL_LIMITS = FrameLimits(allowed_types=frozenset({MessageType.ERROR}), max_data=control.MAX_CONTROL_BODY)
# A refusal is written before the hang-up, so it is there already; this only bounds a stall.
_REFUSAL_WAIT = 0.5


def refusal_after_hangup(stream: Stream) -> AlpcError | None:
    """Why the broker hung up on us, if it said so first (an ERROR frame left unread).

    A broker that turns a connection away (a per-uid quota) writes its refusal
    and closes at once, so our own send can fail before we read the reason.
    """
    try:
        frame, _ = read_frame(stream, FrameDecoder(_REFUSAL_LIMITS), deadline_after(_REFUSAL_WAIT), "a refusal")
    except AlpcError:
        return None
    if frame is None:
        return None
    try:
        return control.decode_body(frame.type, frame.data, control.ErrorReply).exception()
    except ProtocolError:
        return None

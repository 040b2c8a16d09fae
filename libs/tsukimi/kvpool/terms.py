"""The terms of what the pool master gives a client (leases, reserved slots): until when it may be used, and on
which of the session's streams it was given."""

from __future__ import annotations


def stream_of_reply(before: int, after: int) -> int | None:
    """The `PoolSession.epoch` of the stream a reply came on, from the epochs before the call and after its reply;
    None when the stream may have changed meanwhile (what the reply says may be of a master that is gone)."""
    if after % 2 and (after == before or (after == before + 1 and not before % 2)):
        return after  # NOTE: the same open stream, or the one the call itself opened.
    return None


def hold_margin_s(term_s: float) -> float:
    """How long before its term a held lease (or a reserved slot) stops being used: time for the last read under
    it to end, and for clocks that run at slightly different rates."""
    return max(1.0, 0.2 * term_s)


def usable_until(sent_at: float, term_s: float) -> float:
    """Local monotonic time after which something given for `term_s`, asked for at `sent_at`, is not used."""
    return sent_at + term_s - hold_margin_s(term_s)

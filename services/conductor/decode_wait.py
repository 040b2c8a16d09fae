"""Requests waiting for KV room on a decode instance. Pure: the conductor service keeps one, re-tries its
requests in arrival order when a decode heartbeat comes, and answers 429 to those whose wait is over (or that
find it full).

The wait must end before the gateway stops waiting for the conductor's answer (`submit_timeout_s`), leaving time to
hand the request to a prefill worker (`dispatch_timeout_s`): `wait_budget_s` derives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# Seconds kept between the end of a wait (plus one dispatch) and the gateway's own timeout.
MARGIN_S = 0.5


def wait_budget_s(decode_wait_s: float, submit_timeout_s: float, dispatch_timeout_s: float) -> float:
    """Seconds a request may wait for decode room: `decode_wait_s`, cut so that the wait and one dispatch end
    `MARGIN_S` before the gateway gives up on the conductor (0: no wait)."""
    return max(0.0, min(decode_wait_s, submit_timeout_s - dispatch_timeout_s - MARGIN_S))


@dataclass
class Waiter(Generic[T]):
    """One waiting request."""

    # What the caller needs to place it again and answer it.
    item: T
    # When it started waiting and when it stops.
    since: float
    deadline: float


class DecodeWaitQueue(Generic[T]):
    """At most `max_requests` requests, each waiting `wait_s` at most, in arrival order."""

    def __init__(self, max_requests: int, wait_s: float):
        self.max_requests = max_requests
        self.wait_s = wait_s
        self._waiters: dict[str, Waiter[T]] = {}

    def __len__(self) -> int:
        return len(self._waiters)

    def __contains__(self, key: str) -> bool:
        return key in self._waiters

    def can_wait(self) -> bool:
        """True when one more request may wait."""
        return self.wait_s > 0 and len(self._waiters) < self.max_requests

    def push(self, key: str, item: T, now: float) -> bool:
        """Queues `item` under `key` until `now + wait_s`; False (nothing queued) when full, when waiting is off
        or when `key` already waits."""
        if not self.can_wait() or key in self._waiters:
            return False
        self._waiters[key] = Waiter(item, now, now + self.wait_s)
        return True

    def waiting(self) -> list[tuple[str, Waiter[T]]]:
        """The waiters in arrival order (a copy: the caller may remove them while going through it)."""
        return list(self._waiters.items())

    def remove(self, key: str) -> Waiter[T] | None:
        """Takes `key` out of the queue; None when it does not wait (any more)."""
        return self._waiters.pop(key, None)

    def expire(self, now: float) -> list[tuple[str, Waiter[T]]]:
        """Takes out and returns the waiters whose wait is over at `now`, in arrival order."""
        over = [(key, w) for key, w in self._waiters.items() if w.deadline <= now]
        for key, _ in over:
            del self._waiters[key]
        return over

    def next_deadline(self) -> float | None:
        """The earliest deadline (None when nobody waits)."""
        return min((w.deadline for w in self._waiters.values()), default=None)

    def drain(self) -> list[tuple[str, Waiter[T]]]:
        """Takes out every waiter, in arrival order."""
        everyone, self._waiters = list(self._waiters.items()), {}
        return everyone

"""Live instances, from their heartbeats; an instance silent for `ttl_s` is dropped. Pure: no transport."""

from __future__ import annotations

from tsukimi.common.messages import Heartbeat


class InstanceRegistry:
    """The set of instances last heard from, by kind."""

    def __init__(self, ttl_s: float):
        self._ttl_s = ttl_s
        self._instances: dict[str, tuple[Heartbeat, float]] = {}

    def observe(self, beat: Heartbeat, now: float) -> bool:
        """Records a heartbeat received at `now`; True when the instance is new."""
        is_new = beat.instance_id not in self._instances
        self._instances[beat.instance_id] = (beat, now)
        return is_new

    def remove(self, instance_id: str) -> None:
        """Forgets an instance (it said goodbye, or stopped answering)."""
        self._instances.pop(instance_id, None)

    def expire(self, now: float) -> list[str]:
        """Drops instances silent for longer than the TTL; returns their ids."""
        dead = [iid for iid, (_, seen) in self._instances.items() if now - seen > self._ttl_s]
        for iid in dead:
            del self._instances[iid]
        return dead

    def alive(self, kind: str, now: float) -> list[Heartbeat]:
        """Latest heartbeat of every instance of `kind` heard from within the TTL."""
        return [b for b, seen in self._instances.values() if b.kind == kind and now - seen <= self._ttl_s]

    def get(self, instance_id: str) -> Heartbeat | None:
        entry = self._instances.get(instance_id)
        return entry[0] if entry else None

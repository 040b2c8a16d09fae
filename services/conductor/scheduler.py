"""Placement policy: which prefill and which decode instance take a request. Pure: data in, data out.

This first policy balances load only (the KV-cache-aware Mooncake policy replaces it later). An instance's load
is what its last heartbeat reported plus what this conductor placed on it since, so a burst of requests
between two heartbeats does not all land on the same instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tsukimi.common.messages import ErrorInfo, Heartbeat


@dataclass
class Placement:
    """Candidate pairs for one request, best first, or why there is none."""

    # Prefill instances to try, best first.
    prefill_ids: list[str] = field(default_factory=list)
    # Decode instance chosen.
    decode_id: str | None = None
    # Transfer-engine segment of that decode instance.
    decode_segment: str = ""
    # Why no placement is possible.
    error: ErrorInfo | None = None


class LeastLoadedScheduler:
    """Picks the least loaded prefill and decode instances that serve the request's model."""

    def __init__(self) -> None:
        # Requests placed on an instance since its last heartbeat.
        self._num_placed: dict[str, int] = {}

    def on_heartbeat(self, beat: Heartbeat) -> None:
        """The instance reported its own load: forget our estimate."""
        self._num_placed[beat.instance_id] = 0

    def forget(self, instance_id: str) -> None:
        self._num_placed.pop(instance_id, None)

    def load(self, beat: Heartbeat) -> int:
        """Requests queued or running on an instance, as far as we know."""
        return beat.num_waiting + beat.num_running + self._num_placed.get(beat.instance_id, 0)

    def place(self, model: str, prefills: list[Heartbeat], decodes: list[Heartbeat]) -> Placement:
        """Candidates for a request of `model` among live instances."""
        prefills = [b for b in prefills if b.model == model]
        decodes = [b for b in decodes if b.model == model and b.kv_segment]
        if not prefills or not decodes:
            missing = "prefill" if not prefills else "decode"
            return Placement(error=ErrorInfo(
                message=f"no {missing} instance is serving model {model!r}; retry later",
                type="service_unavailable", code="no_capacity", http_status=503,
            ))
        ranked = sorted(prefills, key=lambda b: (self.load(b), b.instance_id))
        decode = min(decodes, key=lambda b: (self.load(b) / max(1, b.max_running), -b.num_free_kv_bytes,
                                             b.instance_id))
        return Placement(
            prefill_ids=[b.instance_id for b in ranked], decode_id=decode.instance_id,
            decode_segment=decode.kv_segment,
        )

    def on_placed(self, prefill_id: str, decode_id: str) -> None:
        """Counts a placement until the instances' next heartbeats."""
        for iid in (prefill_id, decode_id):
            self._num_placed[iid] = self._num_placed.get(iid, 0) + 1

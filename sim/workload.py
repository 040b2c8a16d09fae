"""The requests a serving simulation replays: one `SimRequest` per trace line, with what happens to it.

A trace line is Mooncake's format: `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (one per 512-token
block of the prompt). Arrival times are in seconds, divided by the rate scale (2.0 = twice the request rate).
"""

from __future__ import annotations


class SimRequest:
    """One request: the trace's facts, then the simulation's record of it."""

    __slots__ = ("index", "request_id", "arrival", "num_prompt_tokens", "num_output_tokens", "keys", "rejected",
                 "first_token_at", "done_at", "token_log", "first_step", "reused_tokens", "fetched_tokens",
                 "prefill_s", "extra")

    def __init__(self, index: int, arrival: float, num_prompt_tokens: int, num_output_tokens: int, keys: tuple):
        self.index = index
        self.request_id = f"r{index}"
        self.arrival = arrival
        self.num_prompt_tokens = max(1, num_prompt_tokens)
        self.num_output_tokens = max(1, num_output_tokens)
        self.keys = keys
        # Why placement refused it ("" = admitted).
        self.rejected = ""
        # When its first token was out (end of its prefill) and its last one (None: not yet).
        self.first_token_at: float | None = None
        self.done_at: float | None = None
        # Tokens 2..n were out at token_log[first_step : first_step + n - 1] (the end times of the steps of the
        # instance that decoded it; shared by the whole batch, so a step costs O(1) whatever the batch size).
        self.token_log: list[float] | None = None
        self.first_step = 0
        # Prompt tokens not recomputed (cached), of which fetched from another instance.
        self.reused_tokens = 0
        self.fetched_tokens = 0
        # Seconds of prefill compute spent on it (transfers excluded).
        self.prefill_s = 0.0
        # Per-mode scratch (placement decision, chunk progress).
        self.extra = None


def requests_from_trace(trace: list[dict], rate_scale: float = 1.0, limit: int | None = None) -> list[SimRequest]:
    """SimRequests in arrival order (stable for equal timestamps)."""
    if rate_scale <= 0:
        raise ValueError("rate scale must be positive")
    rows = trace[:limit] if limit else trace
    order = sorted(range(len(rows)), key=lambda i: rows[i]["timestamp"])
    return [SimRequest(n, rows[i]["timestamp"] / 1000.0 / rate_scale, int(rows[i]["input_length"]),
                       int(rows[i]["output_length"]), tuple(rows[i]["hash_ids"])) for n, i in enumerate(order)]

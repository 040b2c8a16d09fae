"""What the conductor answers a request it does not place: the error the gateway shows (status, code, message,
Retry-After). Pure."""

from __future__ import annotations

from tsukimi.common.messages import ErrorInfo, GenerateRequest
from tsukimi.conductor.cluster import DecodeInstance
from tsukimi.conductor.placement import Decision


def overloaded(why: str, retry_after_s: float) -> ErrorInfo:
    """A 429 with Retry-After: worth sending again later."""
    return ErrorInfo(message=f"the server is overloaded: {why}; retry later", type="rate_limit_error",
                     code="overloaded", http_status=429, retry_after_s=retry_after_s)


def refusal(request: GenerateRequest, decision: Decision, ttft_slo_s: float, tbt_slo_s: float,
            has_prefills: bool, decodes: list[DecodeInstance], num_waiting: int | None) -> ErrorInfo:
    """The error of a rejected `decision`; `num_waiting`: requests waiting for decode room (None: waiting off)."""
    if decision.rejected == "no_capacity":
        missing = "decode" if has_prefills else "prefill"
        return ErrorInfo(message=f"no {missing} instance is serving model {request.model!r}; retry later",
                         type="service_unavailable", code="no_capacity", http_status=503)
    if decision.rejected == "kv_too_large":
        num_prompt, num_output = len(request.prompt_token_ids), request.sampling.max_tokens
        most = max((d.num_kv_tokens for d in decodes), default=0)
        return ErrorInfo(message=f"the request needs KV cache for {num_prompt + num_output} tokens (prompt "
                                 f"{num_prompt} + max_tokens {num_output}), more than any decode instance holds "
                                 f"({most} tokens); shorten the prompt or lower max_tokens",
                         type="invalid_request_error", code="kv_capacity_exceeded", http_status=400)
    no_room = "no decode instance has room for its KV"
    why = {"ttft_slo": f"its time to first token would be {decision.judged_ttft_s:.1f}s, over the "
                       f"{ttft_slo_s:g}s objective",
           "tbt_slo": f"its time between tokens would be {decision.predicted_tbt_s * 1000:.0f}ms, over the "
                      f"{tbt_slo_s * 1000:.0f}ms objective",
           "decode_full": no_room if num_waiting is None else f"{no_room}, and {num_waiting} requests already wait "
                                                               f"for room"}[decision.rejected]
    return overloaded(why, max(1.0, decision.judged_ttft_s - ttft_slo_s))


def wait_over(wait_s: float, decodes: list[DecodeInstance], now: float) -> ErrorInfo:
    """The 429 of a request that found no decode room within `wait_s`; Retry-After: until the first request booked
    on `decodes` is predicted to end (at least 1 s)."""
    first = min((e.finish_at for d in decodes for e in d.entries.values()), default=now)
    return overloaded(f"no decode instance had room for its KV within {wait_s:g}s", max(1.0, first - now))


def cancelled(reason: str) -> ErrorInfo:
    """The answer to a request cancelled while it waited (its client has gone)."""
    return ErrorInfo(message=f"cancelled while waiting for decode room ({reason})", type="invalid_request_error",
                     code="cancelled", http_status=499)


def shutting_down() -> ErrorInfo:
    """The answer to a request still waiting when the conductor stops."""
    return ErrorInfo(message="the conductor is shutting down; retry", type="service_unavailable",
                     code="no_capacity", http_status=503, retry_after_s=1.0)

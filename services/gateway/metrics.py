"""The gateway's Prometheus metrics (process-wide, on the default registry served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Finished generation requests by endpoint and outcome: the HTTP status, or for a stream that failed after its
# headers went out the status its error carries; 499 when the client went away first.
REQUESTS = Counter(
    "tsukimi_gateway_requests_total",
    "Generation requests handled, by endpoint and status",
    ["endpoint", "status"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tsukimi_gateway_time_to_first_token_seconds",
    "Seconds from a request's arrival to its first output token",
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "tsukimi_gateway_inter_token_latency_seconds",
    "Seconds between two consecutive output tokens of a request",
    buckets=_TOKEN_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "tsukimi_gateway_request_duration_seconds",
    "Seconds from a generation request's arrival to its end",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("tsukimi_gateway_requests_in_flight", "Generation requests admitted and not yet finished")
PROMPT_TOKENS = Counter("tsukimi_gateway_prompt_tokens_total", "Prompt tokens of admitted requests")
GENERATION_TOKENS = Counter("tsukimi_gateway_generation_tokens_total", "Output tokens received from workers")
CANCELS = Counter("tsukimi_gateway_cancels_total", "CancelRequests published, by reason", ["reason"])

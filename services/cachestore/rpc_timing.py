"""The decorator of the master's gRPC handlers: each call's latency, and a refusal while not the master."""

from __future__ import annotations

import functools
import time

import grpc

from tsukimi.cachestore import metrics


def timed(method=None, *, name: str | None = None):
    """Records the call's latency under its name (or `name`); refuses calls while this instance is not the
    master."""
    if method is None:
        return functools.partial(timed, name=name)

    @functools.wraps(method)
    async def wrapper(self, request, context, *args):
        if self.pool is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"not the pool master{': ask ' + self.master_hint if self.master_hint else ''}")
        started = time.perf_counter()
        try:
            return await method(self, request, context, *args)
        finally:
            histogram.observe(time.perf_counter() - started)

    histogram = metrics.RPC_SECONDS.labels(name or method.__name__)
    return wrapper

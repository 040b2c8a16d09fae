"""The one thread a model worker runs its forwards in."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class ComputeThread:
    """Runs blocking model work off the event loop, always in the same thread.

    NOTE: torch's OpenMP runtime keeps a team of worker threads per calling thread. Forwards handed to asyncio's
    default executor ran in whichever of its threads was free, so a worker built a team in each, and idle teams
    spun beside the running one (with two torch threads, four busy threads in a decode worker instead of two)."""

    def __init__(self, name: str):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in the compute thread, after whatever was handed to it before."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Lets the thread end once its work is done."""
        self._executor.shutdown(wait=False)

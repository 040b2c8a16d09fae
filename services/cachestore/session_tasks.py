"""The tasks answering a master's sessions (gRPC streams and lane connections), ended when its pool goes."""

from __future__ import annotations

import asyncio


class SessionTasks:
    """Tracks the tasks answering sessions; `end_all` cancels them and remembers that it did, so a task can tell
    that cancellation (its pool went) from the server's or the client's."""

    def __init__(self):
        self._tasks: set[asyncio.Task] = set()
        # The ones cancelled by `end_all` (other cancellations are the server's or the client's).
        self._ending: set[asyncio.Task] = set()

    def track(self) -> None:
        """Called by the task answering a session: `end_all` cancels it until it is done."""
        task = asyncio.current_task()
        self._tasks.add(task)
        task.add_done_callback(self._forget)

    def end_all(self) -> None:
        """Cancels every tracked task, as ending (see `is_ending`)."""
        for task in list(self._tasks):
            self._ending.add(task)
            task.cancel()

    def is_ending(self, task: asyncio.Task) -> bool:
        """Whether `task` was cancelled by `end_all`."""
        return task in self._ending

    def _forget(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._ending.discard(task)

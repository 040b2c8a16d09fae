"""The finished work a `PoolClient` carries on its next call: put ends, lease releases, reads under held leases,
slot ends and slots given back, per stream of the session, and the linger timer that sends it alone when no call
follows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from tsukimi.kvpool.block_keys import BlockKey
from tsukimi.proto import cachestore_pb2 as pb

log = logging.getLogger(__name__)


class CarriedWork:
    """Finished work not sent yet, done on one stream (`PoolSession.epoch`) of `stub`: `take` hands it to the next
    call as its `done`; `arm` makes sure it goes out within `linger_s` (by calling `on_linger`) when none follows.
    Work of a stream that ended is dropped, never sent on the next one."""

    def __init__(self, stub, linger_s: float, on_linger: Callable[[], None]):
        self._stub = stub
        # How long finished work may wait for a call to ride on before it gets its own.
        self.linger_s = linger_s
        self._on_linger = on_linger
        # The stream the work below was done on; None over a plain stub.
        self._work_stream: int | None = None
        self._ends: list[BlockKey] = []
        # (key, lease id) of the leases to give back.
        self._releases: list[tuple[BlockKey, int]] = []
        # Keys read under held leases since the last call.
        self._held_reads: list[BlockKey] = []
        # (slot id, key, checksum) of slots written, and ids of slots to give back.
        self._slot_ends: list[tuple[int, BlockKey, str]] = []
        self._returned_slots: list[int] = []
        self._flusher: asyncio.TimerHandle | None = None
        # Calls under way that carry finished work, each resolved once answered (a flush waits for them).
        self._carrying: set[asyncio.Future] = set()
        self._is_closed = False

    @property
    def num_pending(self) -> int:
        """Put ends, releases, held reads, slot ends and slots to give back, not sent yet."""
        return (len(self._ends) + len(self._releases) + len(self._held_reads) + len(self._slot_ends)
                + len(self._returned_slots))

    # ---- streams -------------------------------------------------------------------------------------------

    def stream(self) -> int | None:
        """The session's stream now (`PoolSession.epoch`); None over a plain stub."""
        return getattr(self._stub, "epoch", None)

    def on_stream(self, stream: int | None) -> bool:
        """Whether finished work done on `stream` may still go out (to the master that stream reached): only
        while that stream is the session's. Work of an earlier stream still waiting is dropped first."""
        if stream != self.stream():
            return False
        self.follow_stream()
        return True

    def follow_stream(self) -> None:
        """Drops the finished work of a stream that is no longer the session's."""
        if self._work_stream != self.stream():
            self._drop()
            self._work_stream = self.stream()

    def _drop(self) -> None:
        """Drops finished work of a stream that ended: the master on the next one may be another, for which these
        put ends, releases and slots would name someone else's puts and leases (the old master expires them)."""
        if self.num_pending:
            log.info("cache pool: the session's stream ended; %d put ends / releases for its master dropped",
                     self.num_pending)
        self._clear()

    def _clear(self) -> None:
        self._ends, self._releases, self._held_reads = [], [], []
        self._slot_ends, self._returned_slots = [], []

    # ---- adding work (the caller checks `on_stream` first, and arms) ---------------------------------------

    def add_ends(self, keys: Iterable[BlockKey]) -> None:
        self._ends.extend(keys)

    def add_release(self, key: BlockKey, lease_id: int) -> None:
        self._releases.append((key, lease_id))

    def add_held_read(self, key: BlockKey) -> None:
        self._held_reads.append(key)

    def add_slot_end(self, slot_id: int, key: BlockKey, checksum: str) -> None:
        self._slot_ends.append((slot_id, key, checksum))

    def add_returned_slots(self, slot_ids: Iterable[int]) -> None:
        self._returned_slots.extend(slot_ids)

    # ---- sending it ----------------------------------------------------------------------------------------

    def take(self) -> pb.Done | None:
        """The work to carry on the call about to go out (None: nothing); it is no longer pending."""
        self.follow_stream()
        if not (self._ends or self._releases or self._held_reads or self._slot_ends or self._returned_slots):
            return None
        done = pb.Done(put_end_keys=self._ends, held_read_keys=self._held_reads, returned_slots=self._returned_slots)
        add = done.releases.add
        for key, lease_id in self._releases:
            release = add()
            release.key, release.lease_id = key, lease_id
        add = done.slot_ends.add
        for slot_id, key, checksum in self._slot_ends:
            end = add()
            end.slot_id, end.key, end.checksum = slot_id, key, checksum
        self._clear()
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        return done

    async def call(self, method, request, timeout: float):
        """One call; while it carries finished work (`request.done`), `carrying` lists it."""
        if not request.HasField("done"):
            return await method(request, timeout=timeout)
        answered = asyncio.get_running_loop().create_future()
        self._carrying.add(answered)
        try:
            return await method(request, timeout=timeout)
        finally:
            self._carrying.discard(answered)
            answered.set_result(None)

    @property
    def carrying(self) -> list[asyncio.Future]:
        """Futures of the calls under way that carry finished work, each resolved once answered."""
        return list(self._carrying)

    def arm(self) -> None:
        """Makes sure finished work goes out within `linger_s` even when no call follows."""
        if self._flusher is None and not self._is_closed:
            self._flusher = asyncio.get_running_loop().call_later(self.linger_s, self._linger_over)

    def _linger_over(self) -> None:
        self._flusher = None
        self._on_linger()

    def close(self) -> None:
        """Arms no more (what is left goes out with the caller's last flush)."""
        self._is_closed = True

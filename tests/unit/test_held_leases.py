"""`HeldLeases`: leases kept after their reads, read under again, let go (least recently read first, when idle,
after their last reader), their releases handed to the carried work. No broker, no server."""

from __future__ import annotations

import asyncio
import time

from tsukimi.kvpool.carried_work import CarriedWork
from tsukimi.kvpool.held_leases import HeldLeases
from tsukimi.proto import cachestore_pb2 as pb

KEYS = [bytes([i]) * 32 for i in range(4)]
SIZE = 4096


class Stub:
    epoch = 1


def leases(max_held: int = 8, idle_s: float = 60.0) -> tuple[HeldLeases, CarriedWork, Stub]:
    stub = Stub()
    work = CarriedWork(stub, 60.0, lambda: None)
    return HeldLeases(work, max_held, idle_s), work, stub


def got(lease_id: int, lease_s: float = 10.0) -> pb.GetReply:
    return pb.GetReply(found=True, replicas=[pb.Replica(offset=lease_id * SIZE, size=SIZE)], lease_id=lease_id,
                       checksum="xxh3:00", lease_s=lease_s)


def releases(work: CarriedWork) -> list[tuple[bytes, int]]:
    done = work.take()
    return [] if done is None else [(r.key, r.lease_id) for r in done.releases]


async def test_hold_keeps_at_most_max_held_least_recently_read_going_first():
    held, work, _ = leases(max_held=2)
    now = time.monotonic()
    assert held.hold(KEYS[0], got(10), now, 1) and held.hold(KEYS[1], got(11), now, 1)
    assert not held.hold(KEYS[1], got(12), now, 1)  # held already: the caller gives the new one back
    assert not held.hold(KEYS[2], got(13, lease_s=0.5), now, 1)  # a term within the margin: never held
    assert held.take(KEYS[0], SIZE, time.monotonic(), 1) is not None  # read again: now the most recent
    held.read_over(KEYS[0], held.held[KEYS[0]], ok=True)
    assert held.hold(KEYS[3], got(14), now, 1)
    assert list(held.held) == [KEYS[0], KEYS[3]] and releases(work) == [(KEYS[1], 11)]
    held.close()


async def test_a_read_under_a_held_lease():
    held, work, _ = leases()
    held.hold(KEYS[0], got(10), time.monotonic(), 1)
    assert held.take(KEYS[0], SIZE + 1, time.monotonic(), 1) is None and KEYS[0] in held  # another size
    lease = held.take(KEYS[0], SIZE, time.monotonic(), 1)
    assert lease.replica.offset == 10 * SIZE and lease.num_readers == 1
    held.let_go(KEYS[0])  # while read: given back by its last reader
    assert KEYS[0] not in held and work.num_pending == 0
    held.read_over(KEYS[0], lease, ok=True)
    assert held.num_reads == 1
    done = work.take()
    assert list(done.held_read_keys) == [KEYS[0]] and [(r.key, r.lease_id) for r in done.releases] == [(KEYS[0], 10)]


async def test_a_failed_read_lets_go():
    held, work, _ = leases()
    held.hold(KEYS[0], got(10), time.monotonic(), 1)
    held.read_over(KEYS[0], held.take(KEYS[0], SIZE, time.monotonic(), 1), ok=False)
    assert len(held) == 0 and held.num_reads == 0 and releases(work) == [(KEYS[0], 10)]


async def test_a_lease_of_a_stream_that_ended_is_forgotten_not_given_back():
    held, work, stub = leases()
    held.hold(KEYS[0], got(10), time.monotonic(), 1)
    stub.epoch = 3
    assert held.take(KEYS[0], SIZE, time.monotonic(), 3) is None
    assert len(held) == 0 and releases(work) == []


async def test_idle_leases_go_back_on_their_own_timer():
    held, work, _ = leases(idle_s=0.05)
    held.hold(KEYS[0], got(10), time.monotonic(), 1)
    await asyncio.sleep(0.03)
    held.hold(KEYS[1], got(11), time.monotonic(), 1)
    await asyncio.sleep(0.04)  # the first sweep: only the first is idle
    assert list(held.held) == [KEYS[1]] and releases(work) == [(KEYS[0], 10)]
    await asyncio.sleep(0.08)
    assert len(held) == 0 and releases(work) == [(KEYS[1], 11)]
    held.close()

"""`SlotStock`: reserved slots per block size, taken by puts, refilled once down to half, given back when idle
or on close, and no reserves for a while after the pool had no room. No broker, no server: `reserve` is a fake."""

from __future__ import annotations

import asyncio
import itertools
import time

from tsukimi.kvpool.carried_work import CarriedWork
from tsukimi.kvpool.slot_stock import Slot, SlotStock
from tsukimi.proto import cachestore_pb2 as pb

SIZE = 4096


class Stub:
    epoch = 1


class Env:
    def __init__(self, reserve_bytes: int = 4 * SIZE, idle_s: float = 60.0, room: int = 1000):
        self.stub = Stub()
        self.work = CarriedWork(self.stub, 60.0, lambda: None)
        self.ids = itertools.count(1)
        self.asked: list[tuple[int, int]] = []
        self.room = room
        self.tasks: list[asyncio.Task] = []
        self.stock = SlotStock(self.work, self.reserve, self.spawn, reserve_bytes, idle_s)

    async def reserve(self, size: int, count: int) -> list[Slot]:
        self.asked.append((size, count))
        count = min(count, self.room)
        self.room -= count
        return [Slot(next(self.ids), pb.Replica(size=size), time.monotonic() + 60.0, self.stub.epoch)
                for _ in range(count)]

    def spawn(self, coro):
        self.tasks.append(asyncio.ensure_future(coro))

    def returned(self) -> list[int]:
        done = self.work.take()
        return [] if done is None else list(done.returned_slots)


async def test_take_reserves_for_the_puts_and_a_stock_then_refills_at_half():
    env = Env()
    taken = await env.stock.take([SIZE, SIZE])
    assert env.asked == [(SIZE, 2 + 4)] and {i: s.slot_id for i, s in taken.items()} == {0: 1, 1: 2}
    assert env.stock.num_slots == 4 and env.tasks == []
    taken = await env.stock.take([SIZE, SIZE])
    assert sorted(s.slot_id for s in taken.values()) == [5, 6] and env.stock.num_slots == 2
    await asyncio.gather(*env.tasks)  # down to half: filled again in the background
    assert env.asked[-1] == (SIZE, 2) and env.stock.num_slots == 4
    env.stock.close()
    assert sorted(env.returned()) == [3, 4, 7, 8] and env.stock.num_slots == 0


async def test_sizes_with_no_stock_take_no_slots():
    env = Env(reserve_bytes=SIZE // 2)
    assert await env.stock.take([SIZE, 0]) == {} and env.asked == []
    assert env.stock.target(SIZE) == 0 and Env(reserve_bytes=1 << 40).stock.target(1) == 256


async def test_no_room_means_no_reserves_for_a_while():
    env = Env(room=0, idle_s=0.05)
    assert await env.stock.take([SIZE]) == {} and len(env.asked) == 1
    assert await env.stock.take([SIZE]) == {} and len(env.asked) == 1
    await asyncio.sleep(0.06)
    env.room = 10
    assert len(await env.stock.take([SIZE])) == 1 and len(env.asked) == 2
    env.stock.close()


async def test_a_slot_past_its_term_goes_back_and_one_of_an_ended_stream_is_left():
    env = Env()
    await env.stock.take([SIZE])
    env.stock.stock[SIZE][-1].until = 0.0  # over its term: given back, the next one taken
    taken = await env.stock.take([SIZE])
    assert taken[0].slot_id == 4 and env.returned() == [5]
    await asyncio.gather(*env.tasks)
    assert [s.slot_id for s in env.stock.stock[SIZE]] == [2, 3, 6, 7]
    env.stub.epoch = 3  # the stream ended: its slots are left to expire (their pool may be gone), new ones asked
    taken = await env.stock.take([SIZE])
    assert taken[0].slot_id == 8 and env.asked[-1] == (SIZE, 1 + 4) and env.returned() == []
    assert [s.slot_id for s in env.stock.stock[SIZE]] == [9, 10, 11, 12]
    env.stock.close()


async def test_an_idle_stock_goes_back_on_its_own_timer():
    env = Env(idle_s=0.05)
    await env.stock.take([SIZE])
    assert env.stock.num_slots == 4
    await asyncio.sleep(0.12)
    assert env.stock.num_slots == 0 and sorted(env.returned()) == [2, 3, 4, 5]

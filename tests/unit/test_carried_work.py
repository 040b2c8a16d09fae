"""`CarriedWork`: finished work kept per stream, handed to the next call as `done`, sent alone after its linger.
No broker, no server: a stub with a settable `epoch`."""

from __future__ import annotations

import asyncio

from tsukimi.kvpool.carried_work import CarriedWork
from tsukimi.proto import cachestore_pb2 as pb

A, B = b"a" * 32, b"b" * 32


class Stub:
    epoch = 1


def work(linger_s: float = 60.0, on_linger=lambda: None) -> tuple[CarriedWork, Stub]:
    stub = Stub()
    return CarriedWork(stub, linger_s, on_linger), stub


def test_take_hands_over_everything_once():
    w, _ = work()
    assert w.take() is None and w.num_pending == 0
    assert w.on_stream(1)
    w.add_ends([A])
    w.add_release(B, 7)
    w.add_held_read(A)
    w.add_slot_end(3, B, "xxh3:00")
    w.add_returned_slots([4, 5])
    assert w.num_pending == 6
    done = w.take()
    assert list(done.put_end_keys) == [A] and list(done.held_read_keys) == [A]
    assert [(r.key, r.lease_id) for r in done.releases] == [(B, 7)]
    assert [(e.slot_id, e.key, e.checksum) for e in done.slot_ends] == [(3, B, "xxh3:00")]
    assert list(done.returned_slots) == [4, 5]
    assert w.num_pending == 0 and w.take() is None


def test_work_of_a_stream_that_ended_is_dropped():
    w, stub = work()
    assert w.on_stream(1)
    w.add_ends([A])
    stub.epoch = 3
    assert not w.on_stream(1)  # done on the old stream: not to be added
    assert w.num_pending == 1  # not dropped until the new stream is used
    assert w.on_stream(3) and w.num_pending == 0
    w.add_ends([B])
    assert list(w.take().put_end_keys) == [B]


def test_a_plain_stub_has_one_stream():
    w = CarriedWork(object(), 60.0, lambda: None)
    assert w.stream() is None and w.on_stream(None) and not w.on_stream(1)


async def test_linger_calls_once_and_take_disarms():
    fired = []
    w, _ = work(linger_s=0.01, on_linger=lambda: fired.append(1))
    w.arm()
    w.arm()
    await asyncio.sleep(0.05)
    assert fired == [1]
    assert w.on_stream(1)
    w.add_ends([A])
    w.arm()
    assert w.take() is not None
    await asyncio.sleep(0.05)
    assert fired == [1]
    w.close()
    w.arm()
    await asyncio.sleep(0.05)
    assert fired == [1]


async def test_a_call_carrying_work_is_listed_until_answered():
    w, _ = work()
    gate = asyncio.Event()
    seen = {}

    async def method(request, timeout):
        seen["timeout"] = timeout
        await gate.wait()
        return "reply"

    gate.set()
    plain = await w.call(method, pb.KeysRequest(), 1.5)
    assert plain == "reply" and w.carrying == [] and seen["timeout"] == 1.5
    gate.clear()
    call = asyncio.ensure_future(w.call(method, pb.KeysRequest(done=pb.Done(put_end_keys=[A])), 1.5))
    await asyncio.sleep(0)
    (carrying,) = w.carrying
    assert not carrying.done()
    gate.set()
    assert await call == "reply" and carrying.done() and w.carrying == []

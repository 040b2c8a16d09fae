"""The prefill request pipeline without a broker: a recording `PrefillBus`, a transfer engine that only counts its
writes; a request cancelled at each stage frees what it took (its decode reservation, its stream's buffer)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tsukimi.common.messages import (
    ErrorInfo, GenerateRequest, KVReservation, PrefillTask, SamplingParams, TaskAck,
)
from tsukimi.common.settings import Settings
from tsukimi.model.loader import build_demo_model
from tsukimi.prefill.chunk_scheduler import ChunkScheduler
from tsukimi.prefill.engine import PrefillEngine
from tsukimi.prefill.held_reservations import HeldReservations
from tsukimi.prefill.pipeline import PrefillPipeline

BLOCK_TOKENS = 16
PROMPT = list(range(40))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_demo_model()


class FakeTransfer:
    """Registers nothing real; every write succeeds."""

    def __init__(self):
        self.registered: set[int] = set()
        self.num_writes = 0

    def register(self, array, read_only: bool = False) -> int:
        handle = len(self.registered) + 1000
        self.registered.add(handle)
        return handle

    def unregister(self, handle: int) -> None:
        self.registered.remove(handle)

    async def transfer(self, requests) -> None:
        self.num_writes += len(requests)


class FakeRuntime:
    def __init__(self, transfer, cache=None):
        self.cancelled: set[str] = set()
        self.transfer = transfer
        self.cache = cache
        self.background: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.background.add(task)
        return task


class RecordingBus:
    """A `PrefillBus` that accepts everything unless told otherwise; `on` hooks run at each call."""

    def __init__(self, block: int, block_bytes: int):
        self.block_tokens, self.block_bytes = block, block_bytes
        self.events, self.reserved, self.released, self.handed_over = [], [], [], []
        self.on: dict[str, callable] = {}
        self.ack = TaskAck(is_accepted=True)

    async def emit(self, event) -> None:
        self.events.append(event)
        self._hook("emit")

    async def reserve(self, decode_id, ask) -> KVReservation:
        self.reserved.append(ask.request_id)
        self._hook("reserve")
        num_blocks = -(-ask.num_tokens // self.block_tokens)
        return KVReservation(is_accepted=True, buffer_id=1, block_ids=list(range(num_blocks)),
                             block_tokens=self.block_tokens, block_bytes=self.block_bytes, nonce=7)

    async def release(self, decode_id, request_id) -> None:
        self.released.append(request_id)

    async def hand_over(self, decode_id, task) -> TaskAck:
        self.handed_over.append(task.request.request_id)
        self._hook("hand_over")
        return self.ack

    def _hook(self, name: str) -> None:
        if name in self.on:
            self.on[name]()


class CancellingEngine(PrefillEngine):
    """Cancels the request (through `cancel`) once its first layer's KV is out: the forward stops at the next."""

    cancel = None

    def start(self, prompt_token_ids, prefix_kv=None, on_layer=None, should_stop=None):
        def layer(index, keys, values):
            on_layer(index, keys, values)
            self.cancel()

        return super().start(prompt_token_ids, prefix_kv, layer if on_layer else None, should_stop)


class Setup:
    def __init__(self, model, engine_type=PrefillEngine, cache=None):
        self.settings = Settings(instance_id="p-test", cache_block_tokens=BLOCK_TOKENS)
        self.engine = engine_type(model)
        block = self.engine.block_layout(BLOCK_TOKENS)
        self.transfer = FakeTransfer()
        self.runtime = FakeRuntime(self.transfer, cache)
        self.bus = RecordingBus(BLOCK_TOKENS, block.num_bytes)
        self.held = HeldReservations()
        self.active = {}
        chunks = ChunkScheduler(self.engine.step, self.engine.chunk_tokens, self.settings.prefill_pack_tokens)
        self.pipeline = PrefillPipeline(self.settings, self.engine, chunks, self.bus, self.runtime, self.held, None,
                                        self.active)

    def cancel(self) -> None:
        self.runtime.cancelled.add("r")

    async def run(self, max_tokens: int = 8) -> None:
        request = GenerateRequest(request_id="r", model="demo", prompt_token_ids=PROMPT,
                                  sampling=SamplingParams(temperature=0, max_tokens=max_tokens), arrival_time=0.0)
        await self.pipeline.run(PrefillTask(request=request, decode_id="d", decode_segment="d"))

    def assert_nothing_held(self) -> None:
        assert len(self.held) == 0 and not self.active and not self.transfer.registered


async def test_a_request_is_reserved_streamed_and_handed_over(model):
    s = Setup(model)
    await s.run()
    assert s.bus.reserved == ["r"] and s.bus.handed_over == ["r"] and s.bus.released == []
    assert [(e.index, e.error) for e in s.bus.events] == [(0, None)]
    assert s.transfer.num_writes > 0
    s.assert_nothing_held()


async def test_cancelled_before_it_starts_takes_nothing(model):
    s = Setup(model)
    s.cancel()
    await s.run()
    assert s.bus.reserved == s.bus.events == s.bus.released == s.bus.handed_over == []
    s.assert_nothing_held()


async def test_cancelled_while_loading_its_prefix_releases_the_reservation(model):
    class Cache:
        is_available = False

        async def load(self, prompt, layout):
            s.cancel()
            return None

        async def close(self):
            pass

    s = Setup(model, cache=Cache())
    await s.run()
    assert s.bus.reserved == ["r"] and s.bus.released == ["r"]
    assert s.bus.events == s.bus.handed_over == []
    s.assert_nothing_held()


async def test_cancelled_while_reserving_releases_the_reservation(model):
    s = Setup(model)
    s.bus.on["reserve"] = s.cancel
    await s.run()
    assert s.bus.released == ["r"] and s.bus.events == s.bus.handed_over == []
    s.assert_nothing_held()


async def test_cancelled_during_the_forward_stops_it_and_frees_the_stream(model):
    s = Setup(model, CancellingEngine)
    s.engine.cancel = s.cancel
    await s.run()
    assert s.bus.released == ["r"] and s.bus.events == s.bus.handed_over == []
    s.assert_nothing_held()


async def test_cancelled_after_the_first_token_is_not_handed_over(model):
    s = Setup(model)
    s.bus.on["emit"] = s.cancel
    await s.run()
    assert [e.index for e in s.bus.events] == [0]
    assert s.bus.released == ["r"] and s.bus.handed_over == []
    s.assert_nothing_held()


async def test_cancelled_during_the_hand_over_tells_the_client_nothing_more(model):
    s = Setup(model)
    s.bus.on["hand_over"] = s.cancel
    s.bus.ack = TaskAck(is_accepted=False, error=ErrorInfo(message="cancelled"))
    await s.run()
    # NOTE: decode answered: it took or freed the blocks itself; prefill sends no release.
    assert [e.index for e in s.bus.events] == [0] and s.bus.released == []
    s.assert_nothing_held()


async def test_a_request_done_at_its_first_token_reserves_nothing(model):
    s = Setup(model)
    await s.run(max_tokens=1)
    assert s.bus.reserved == [] and [e.finish_reason for e in s.bus.events] == ["length"]
    s.assert_nothing_held()

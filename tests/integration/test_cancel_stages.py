"""A request cancelled at each stage of its life frees everything it held.

Stages: (1) queued at prefill behind another request, (2) prefilling (between two layers of its forward),
(3) its KV being written to the decode worker's blocks, (4) decoding. After each cancellation the decode worker's
KV blocks are all free, its reservation inbox is empty, its engine holds no sequence, and the prefill worker runs
nothing and its transfer engine holds no more registered buffers than before the request.

Stages are reached deterministically with gates: a prefill forward is held in prefill's compute thread once its
first layer's KV is sent (a patched `KVStream.send_layer`), KV writes are held before they start (a patched
`KVStream._write`). The services are those of test_pipeline's `cluster` fixture (conductor, prefill and decode
in this loop over a real NATS server).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import nats
import pytest
from tsukimi.common import subjects
from tsukimi.common.messages import (
    CancelRequest,
    GenerateRequest,
    SamplingParams,
    SubmitReply,
    TokenEvent,
    decode,
    encode,
)
from tsukimi.prefill.kv_stream import KVStream

from tests.integration.test_pipeline import cluster, generate, model  # noqa: F401  (fixtures and helper)

# Long enough to fill several decode blocks (64 tokens each), short enough to prefill quickly on 2 cores.
PROMPT = list(b"Cancellation must give back every block. ") * 6  # 246 tokens: 4 blocks


async def until(predicate, what, timeout: float = 5.0) -> None:
    """Polls `predicate` until true; fails after `timeout` s saying `what` (a string, or a callable making one)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what() if callable(what) else what}"
        await asyncio.sleep(0.02)


async def submit(nc, prompt: list[int], max_tokens: int):
    """Submits like the gateway does; returns (request id, subscription to its token stream)."""
    rid = uuid.uuid4().hex
    sub = await nc.subscribe(subjects.stream(rid))
    request = GenerateRequest(request_id=rid, model="demo", prompt_token_ids=prompt, arrival_time=time.time(),
                              sampling=SamplingParams(temperature=0, max_tokens=max_tokens))
    reply = decode((await nc.request(subjects.SUBMIT, encode(request), timeout=10)).data, SubmitReply)
    assert reply.is_accepted, reply.error
    return rid, sub


async def cancel(nc, rid: str) -> None:
    await nc.publish(subjects.CANCEL, encode(CancelRequest(request_id=rid, reason="client_disconnected")))


async def next_event(sub, timeout: float = 10.0) -> TokenEvent:
    return decode((await sub.next_msg(timeout=timeout)).data, TokenEvent)


async def assert_silent(sub) -> None:
    """The stream carries no (further) event."""
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.3)


def state(prefill, decoder) -> dict:
    """What the workers hold now."""
    kv = decoder.engine.kv
    return {"used_blocks": kv.num_blocks - kv.num_free_blocks, "reservations": len(decoder.inbox),
            "waiting": decoder.engine.num_waiting, "running": decoder.engine.num_running,
            "prefill_queued": len(prefill._queued_lengths), "prefilling": prefill.num_running,
            "prefill_buffers": len(prefill.transfer._buffers)}


def idle(buffers: int) -> dict:
    return {"used_blocks": 0, "reservations": 0, "waiting": 0, "running": 0, "prefill_queued": 0, "prefilling": 0,
            "prefill_buffers": buffers}


def baseline(prefill, decoder) -> int:
    """Prefill's registered buffers at rest, once both workers are checked idle."""
    buffers = len(prefill.transfer._buffers)
    assert state(prefill, decoder) == idle(buffers)
    return buffers


async def assert_freed(prefill, decoder, buffers: int) -> None:
    """Waits (up to 5 s) until both workers hold nothing again."""
    await until(lambda: state(prefill, decoder) == idle(buffers),
                lambda: f"everything freed, still held: {state(prefill, decoder)}")


def held(decoder, buffers: int, prefilling: bool) -> dict:
    """The state while one request of PROMPT holds its reservation and its staging buffer, nothing else running."""
    return {**idle(buffers + 1), "used_blocks": decoder.engine.kv.num_blocks_for(len(PROMPT)), "reservations": 1,
            "prefilling": int(prefilling)}


class LayerGate:
    """Records every layer of KV prefill sends to decode; the first layer of a forward waits (in prefill's
    compute thread, its write submitted) until `go` is set."""

    def __init__(self):
        self.reached = threading.Event()
        self.go = threading.Event()
        self.sent: list[tuple[int, int]] = []  # (prompt tokens, layer index) of every layer sent

    def after(self, stream: KVStream, index: int) -> None:
        self.sent.append((stream.num_tokens, index))
        if index == 0:
            self.reached.set()
            self.go.wait(10)


@pytest.fixture
def layer_gate(cluster, monkeypatch):  # noqa: F811
    gate = LayerGate()
    send = KVStream.send_layer

    def send_layer(stream, index, keys, values):
        send(stream, index, keys, values)
        gate.after(stream, index)

    monkeypatch.setattr(KVStream, "send_layer", send_layer)
    yield gate
    gate.go.set()  # never leave prefill's thread waiting


@pytest.fixture
def write_gate(cluster, monkeypatch):  # noqa: F811
    """Holds every KV write to decode before it starts until the yielded (reached, go) events say so."""
    reached, go = asyncio.Event(), asyncio.Event()
    write = KVStream._write

    async def held_write(stream, requests):
        reached.set()
        await go.wait()
        await write(stream, requests)

    monkeypatch.setattr(KVStream, "_write", held_write)
    yield reached, go
    go.set()


async def test_cancel_while_queued(cluster, layer_gate):  # noqa: F811
    nc, _, prefill, decoder = cluster
    buffers = baseline(prefill, decoder)
    _, first_sub = await submit(nc, PROMPT, 4)
    await until(layer_gate.reached.is_set, "the first prefill to start")
    # Accepted: prefill has taken the task, behind the forward held in its first layer.
    rid, sub = await submit(nc, list(b"queued, then cancelled: ") * 8, 4)
    await cancel(nc, rid)
    await until(lambda: rid in prefill.cancelled, "prefill to note the cancellation")
    layer_gate.go.set()
    events = [await next_event(first_sub) for _ in range(4)]
    assert [e.error for e in events] == [None] * 4 and events[-1].finish_reason == "length"
    await assert_freed(prefill, decoder, buffers)
    assert {n for n, _ in layer_gate.sent} == {len(PROMPT)}, "the cancelled request was prefilled"
    await assert_silent(sub)


async def test_cancel_while_prefilling(cluster, layer_gate):  # noqa: F811
    nc, _, prefill, decoder = cluster
    buffers = baseline(prefill, decoder)
    rid, sub = await submit(nc, PROMPT, 2000)
    await until(layer_gate.reached.is_set, "the prefill's first layer")
    assert state(prefill, decoder) == held(decoder, buffers, prefilling=True)
    await cancel(nc, rid)
    await until(lambda: rid in prefill.cancelled, "prefill to note the cancellation")
    layer_gate.go.set()
    await assert_freed(prefill, decoder, buffers)
    assert layer_gate.sent == [(len(PROMPT), 0)], "the forward went on after the cancellation"
    await assert_silent(sub)


async def test_cancel_while_transferring(cluster, write_gate):  # noqa: F811
    nc, _, prefill, decoder = cluster
    reached, go = write_gate
    buffers = baseline(prefill, decoder)
    rid, sub = await submit(nc, PROMPT, 2000)
    first = await next_event(sub)  # the forward is over; prefill now waits for the held writes
    assert first.index == 0 and first.error is None and reached.is_set()
    await cancel(nc, rid)
    await until(lambda: rid in prefill.cancelled and rid in decoder.inbox._cancelled,
                "both workers to note the cancellation")
    # Writes may still land in the blocks: they stay reserved (and the staging buffer registered) until released.
    await asyncio.sleep(0.2)  # room for a premature free to show
    assert state(prefill, decoder) == held(decoder, buffers, prefilling=False)
    go.set()
    await assert_freed(prefill, decoder, buffers)
    await assert_silent(sub)


async def test_cancel_while_decoding(cluster):  # noqa: F811
    nc, _, prefill, decoder = cluster
    buffers = baseline(prefill, decoder)
    _, tokens, finish, error = await generate(nc, PROMPT, SamplingParams(temperature=0, max_tokens=2000),
                                              cancel_after=3)
    assert finish is None and error is None and len(tokens) == 3  # tokens 1 and 2 came from decode
    await assert_freed(prefill, decoder, buffers)

"""The colocated baseline's parts: the device lock (FIFO, chunk turn-taking), the in-process prefix cache (LRU
with exact expectations), chunked prefill (token-identical to transformers), and pair placement."""

import asyncio
import threading
import time

import pytest
import torch

from tsukimi.kvpool.block_keys import block_keys
from tsukimi.common.cost_model import CostModel
from tsukimi.common.messages import Heartbeat, PrefillStatus
from tsukimi.conductor.cluster import ClusterView, DecodeEntry, DecodeInstance, PrefillInstance
from tsukimi.conductor.placement import PlacementConfig, Placer, Request
from tsukimi.colocated.service import ComputeLock, LocalPrefixCache
from tsukimi.model.kv import layout_of
from tsukimi.model.loader import build_demo_model
from tsukimi.prefill.engine import PrefillEngine

from tests.unit.tiny_model import TINY, greedy, reference



# ---- ComputeLock ------------------------------------------------------------------------------------------

def test_lock_is_exclusive_and_first_come_first_served():
    lock = ComputeLock()
    order, inside = [], []
    release = threading.Event()

    def first():
        with lock.hold():
            inside.append("first")
            release.wait(5)
            order.append("first")

    def later(name):
        with lock.hold():
            order.append(name)

    t0 = threading.Thread(target=first)
    t0.start()
    while not inside:
        time.sleep(0.001)
    assert lock.is_held
    threads = []
    for name in ("a", "b", "c"):
        t = threading.Thread(target=later, args=(name,))
        t.start()
        threads.append(t)
        time.sleep(0.05)  # each asks after the previous one
    assert order == []  # nobody runs while the device is held
    release.set()
    for t in [t0, *threads]:
        t.join(5)
    assert order == ["first", "a", "b", "c"]
    assert not lock.is_held


def test_chunks_let_one_decode_step_in_between():
    lock = ComputeLock()
    log: list[str] = []
    decode_has_work = threading.Event()
    decode_has_work.set()
    stop = threading.Event()

    def decode_loop():
        while not stop.is_set():
            time.sleep(0.005)  # the decode loop's time between steps (publishing events)
            with lock.hold():
                log.append("d")
                time.sleep(0.002)
            lock.decode_step_done()

    chunk = lock.chunk_turns(decode_has_work.is_set)
    t = threading.Thread(target=decode_loop)
    t.start()
    time.sleep(0.02)
    log.append("|")
    for _ in range(4):
        with chunk():
            log.append("p")
            time.sleep(0.01)
    decode_has_work.clear()
    stop.set()
    t.join(5)
    prefill = "".join(log).split("|")[1]
    # Between two chunks exactly one decode step (the decode asks once per loop iteration).
    between = prefill[prefill.index("p"):prefill.rindex("p") + 1]
    assert between == "pdpdpdp"


def test_chunk_does_not_wait_when_decode_is_idle():
    lock = ComputeLock()
    chunk = lock.chunk_turns(lambda: False)
    started = time.perf_counter()
    for _ in range(5):
        with chunk():
            pass
    assert time.perf_counter() - started < 0.1
    assert lock.wait_decode_step(0, lambda: True, timeout_s=0.01) is False


# ---- LocalPrefixCache -------------------------------------------------------------------------------------

BT = 4  # tokens per block
LAYOUT_KW = dict(num_layers=1, heads=1, dim=2)  # one block = 2 (K,V) * 1 * 1 * 4 * 2 * 4 B = 64 bytes


def kv_of(tokens: list[int]):
    """A fake KV whose values are the token ids (so joins can be checked)."""
    t = torch.tensor(tokens, dtype=torch.float32).view(1, 1, len(tokens), 1).repeat(1, 1, 1, 2)
    return [(t.clone(), -t.clone())]


def test_local_cache_loads_the_longest_cached_prefix_and_leaves_a_token():
    cache = LocalPrefixCache("m", BT, capacity_bytes=10_000)
    prompt = list(range(1, 13))  # 3 full blocks
    assert asyncio.run(cache.store(prompt, kv_of(prompt), 0)) == 3
    assert cache.num_bytes == 3 * 64
    # The same prompt: only 2 blocks may be reused (one token must be computed).
    layout = layout_of(kv_of(prompt[:BT]))
    got = asyncio.run(cache.load(prompt, layout))
    assert got[0][0][0, 0, :, 0].tolist() == list(range(1, 9))
    assert got[0][1][0, 0, :, 0].tolist() == [-x for x in range(1, 9)]
    # A prompt diverging inside block 2 reuses block 1 only; a different first block reuses nothing.
    assert asyncio.run(cache.load(prompt[:6] + [99] * 7, layout))[0][0].shape[2] == 4
    assert asyncio.run(cache.load([99] + prompt[1:], layout)) is None
    # Storing after a 2-block hit adds only the new blocks.
    longer = prompt + list(range(13, 21))
    assert asyncio.run(cache.store(longer, kv_of(longer), 2)) == 2
    assert len(cache) == 5


def test_local_cache_evicts_least_recently_used_tails_first():
    cache = LocalPrefixCache("m", BT, capacity_bytes=4 * 64)
    a = [1] * 12  # blocks a1 a2 a3
    b = [2] * 8  # blocks b1 b2
    ka, kb = block_keys(a, BT, "m"), block_keys(b, BT, "m")
    asyncio.run(cache.store(a, kv_of(a), 0))
    # Most recent is a chain's first block: LRU order a3, a2, a1.
    assert cache.keys() == [ka[2], ka[1], ka[0]]
    asyncio.run(cache.store(b, kv_of(b), 0))
    # 5 blocks > 4: a's tail (a3) goes first.
    assert cache.keys() == [ka[1], ka[0], kb[1], kb[0]]
    assert cache.num_evicted == 1 and cache.num_bytes == 4 * 64
    # Using a's prefix makes it the most recent; the next store evicts b's tail.
    layout = layout_of(kv_of([0] * BT))
    assert asyncio.run(cache.load(a[:9], layout))[0][0].shape[2] == 8
    assert cache.keys() == [kb[1], kb[0], ka[1], ka[0]]
    c = [3] * 4
    asyncio.run(cache.store(c, kv_of(c), 0))
    assert cache.keys() == [kb[0], ka[1], ka[0], block_keys(c, BT, "m")[0]]
    # A block larger than the whole cache is not kept.
    tiny = LocalPrefixCache("m", BT, capacity_bytes=32)
    assert asyncio.run(tiny.store(a, kv_of(a), 0)) == 0 and len(tiny) == 0


# ---- chunked prefill --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return build_demo_model(TINY, seed=3)


@pytest.mark.parametrize("chunk", [1, 3, 5, 16, 100])
def test_chunked_prefill_is_token_identical_and_takes_the_device_per_chunk(model, chunk):
    prompt = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 1, 3, 2, 9, 7, 5, 11]
    forwards = []

    class Counting:
        def __enter__(self):
            forwards.append(1)

        def __exit__(self, *exc):
            return False

    engine = PrefillEngine(model, chunk, Counting)
    assert greedy(model, engine, prompt, 12) == reference(model, prompt, 12)
    assert len(forwards) == -(-len(prompt) // chunk)
    whole = PrefillEngine(model).run(prompt)
    chunked = engine.run(prompt)
    assert [k.shape for k, _ in chunked.kv] == [k.shape for k, _ in whole.kv]
    # After a reused prefix only the rest is chunked.
    prefix = [(k[:, :, :8], v[:, :, :8]) for k, v in whole.kv]
    forwards.clear()
    assert greedy(model, engine, prompt, 6, prefix) == reference(model, prompt, 6)
    assert len(forwards) == -(-(len(prompt) - 8) // chunk)


# ---- pair placement ---------------------------------------------------------------------------------------

COST = CostModel(prefill_per_token_s=0.001, decode_base_s=0.010, decode_per_seq_s=0.001, kv_bytes_per_token=1000)


def pairs(n=3):
    prefills = [PrefillInstance(f"c{i}-prefill", COST, colocated_with=f"c{i}-decode") for i in range(n)]
    decodes = [DecodeInstance(f"c{i}-decode", COST, max_batch_size=4, num_kv_tokens=10_000) for i in range(n)]
    return prefills, decodes


def colocated(**kw):
    return Placer(PlacementConfig(policy="colocated", block_tokens=100, transfer_bytes_per_s=1e9, ttft_slo_s=10,
                                  tbt_slo_s=1, **kw))


REQ = Request("r1", num_prompt_tokens=100, num_output_tokens=10)


def test_colocated_places_prefill_and_decode_on_the_least_loaded_pair():
    prefills, decodes = pairs()
    decodes[0].add("x", DecodeEntry(100, 0.0, 5.0))
    decodes[1].add("y", DecodeEntry(100, 0.0, 5.0))
    prefills[2].busy_until = 0.3  # c2 has no request booked on decode but a queued prefill: still fewest requests
    d = colocated().place(REQ, 0.0, prefills, decodes, {})
    assert (d.prefill_id, d.decode_id, d.alternates) == ("c2-prefill", "c2-decode", [])
    assert d.predicted_ttft_s == pytest.approx(0.3 + 0.1)
    # Committing books it on that pair; equal request counts then break ties on the prefill queue, then id.
    placer = colocated()
    placer.commit(REQ, d, 0.0, {p.instance_id: p for p in prefills}, {x.instance_id: x for x in decodes})
    assert len(decodes[2].entries) == 1
    d = placer.place(Request("r2", 100, 10), 0.0, prefills, decodes, {})
    assert (d.prefill_id, d.decode_id) == ("c0-prefill", "c0-decode")
    prefills[0].busy_until = 1.0
    d = placer.place(Request("r3", 100, 10), 0.0, prefills, decodes, {})
    assert (d.prefill_id, d.decode_id) == ("c1-prefill", "c1-decode")


def test_colocated_needs_a_live_pair_and_rejects_a_full_one():
    prefills, decodes = pairs(2)
    assert colocated().place(REQ, 0.0, prefills, decodes[1:], {}).decode_id == "c1-decode"
    assert colocated().place(REQ, 0.0, prefills[:1], decodes[1:], {}).rejected == "no_capacity"
    plain = [PrefillInstance("p0", COST)]
    assert colocated().place(REQ, 0.0, plain, decodes, {}).rejected == "no_capacity"
    for d in decodes:
        for i in range(4):
            d.add(f"{d.instance_id}-{i}", DecodeEntry(100, 0.0, 50.0))
    assert colocated().place(REQ, 0.0, prefills, decodes, {}).rejected == "decode_full"
    # Without rejection it waits for room on the least loaded pair.
    assert colocated(rejection="none").place(REQ, 0.0, prefills, decodes, {}).decode_id == "c0-decode"


def test_cluster_view_learns_the_pair_from_heartbeats():
    view = ClusterView(None)
    view.observe(Heartbeat(instance_id="c0-prefill", status=PrefillStatus(), model="demo",
                           colocated_with="c0-decode"), 0.0)
    view.observe(Heartbeat(instance_id="p1", status=PrefillStatus(), model="demo"), 0.0)
    assert view.prefills["c0-prefill"].colocated_with == "c0-decode"
    assert view.prefills["p1"].colocated_with == ""

"""The paged decode engine: finish rules, block accounting, preemption, the TBT-bounded batch; outputs equal to
transformers' greedy `generate`. Torch, no bus."""

import pytest

from tsukimi.common.messages import SamplingParams
from tsukimi.decode.engine import DecodeEngine
from tsukimi.decode.kv_blocks import KVBlocks
from tsukimi.model.loader import build_demo_model
from tsukimi.prefill.engine import PrefillEngine
from tests.unit.tiny_model import TINY, reference


@pytest.fixture(scope="module")
def model():
    return build_demo_model(TINY, seed=7)


def _engine(model, num_blocks=64, max_batch_size=8, **kwargs) -> DecodeEngine:
    return DecodeEngine(model, max_batch_size, 256, KVBlocks(PrefillEngine(model).block_layout(4), num_blocks),
                        **kwargs)


def _seq(model, engine, rid, prompt, max_tokens, stop_ids=()):
    result = PrefillEngine(model).run(prompt)
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=list(stop_ids))
    return engine.sequence_with_kv(rid, sampling, result.kv, int(result.logits.argmax()), prompt)


def _run(engine, arrived, cancel_at=None):
    """Steps until idle; per request its tokens after the first (and the engine's free blocks each step)."""
    out, free = {}, []
    step = 0
    while arrived or engine.has_work():
        assert step < 1000, "the engine stopped making progress"
        events, _ = engine.step(arrived, (cancel_at or {}).get(step, set()))
        arrived = []
        for e in events:
            out.setdefault(e.request_id, []).append(e.token_id)
        free.append(engine.kv.num_free_blocks)
        step += 1
    return out, free


def test_finishes_on_length_and_frees_every_block(model):
    engine = _engine(model, num_blocks=16)
    seq = _seq(model, engine, "a", [1, 2, 3, 4, 5], max_tokens=4)
    assert seq.block_ids == [0, 1] and engine.kv.num_free_blocks == 14
    events, left = engine.step([seq], set())
    assert [e.index for e in events] == [1] and left == []
    engine.step([], set())
    events, left = engine.step([], set())
    assert events[0].index == 3 and events[0].finish_reason == "length" and left == ["a"]
    assert engine.num_running == 0 and engine.kv.num_free_blocks == 16


def test_sequences_grow_by_block_and_match_generate(model):
    engine = _engine(model)
    prompts = [[7] * 3, list(range(20, 29)), list(range(40, 44)), [5, 6]]
    seqs = [_seq(model, engine, f"r{i}", p, 14) for i, p in enumerate(prompts)]
    first = {s.request_id: s.next_token_id for s in seqs}
    out, free = _run(engine, seqs)
    for i, p in enumerate(prompts):
        assert [first[f"r{i}"]] + out[f"r{i}"] == reference(model, p, 14)
    # Blocks of 4 tokens; after 12 steps (the last one frees everything) the rows hold 15, 21, 16 and 14 tokens:
    # 4 + 6 + 4 + 4 = 18 blocks at the peak.
    assert min(free) == 64 - 18 and free[-1] == 64


def test_stop_token_and_batch_limit(model):
    probe = _engine(model)
    out, _ = _run(probe, [_seq(model, probe, "p", [5, 6, 7], 2)])
    stop_id = out["p"][0]
    engine = _engine(model, max_batch_size=2)
    seqs = [_seq(model, engine, "s", [5, 6, 7], 50, [stop_id])] + [
        _seq(model, engine, f"r{i}", [10 + i] * (3 + i), 50) for i in range(2)]
    events, left = engine.step(seqs, set())
    assert {e.request_id for e in events} == {"s", "r0"} and left == ["s"]
    assert [e.finish_reason for e in events if e.request_id == "s"] == ["stop"]
    events, left = engine.step([], {"r0"})
    assert left == ["r0"] and {e.request_id for e in events} == {"r1"}  # r1 joined as the others left
    engine.step([], {"r1"})
    assert engine.kv.num_free_blocks == 64


def test_cancel_frees_waiting_and_running_blocks(model):
    engine = _engine(model, max_batch_size=1)
    seqs = [_seq(model, engine, f"r{i}", list(range(9)), 30) for i in range(3)]
    engine.step(seqs, set())
    assert engine.num_running == 1 and engine.num_waiting == 2
    _, left = engine.step([], {"r0", "r2"})
    assert sorted(left) == ["r0", "r2"] and engine.num_running == 1 and engine.num_waiting == 0
    engine.step([], {"r1"})
    assert not engine.has_work() and engine.kv.num_free_blocks == 64


@pytest.mark.parametrize("max_batch_size", [1, 2, 3])
def test_out_of_blocks_preempts_and_resumes_with_identical_output(model, max_batch_size):
    prompts = [list(range(10, 17)), list(range(30, 36)), list(range(50, 58))]
    roomy = _engine(model)
    want, _ = _run(roomy, [_seq(model, roomy, f"r{i}", p, 20) for i, p in enumerate(prompts)])
    # 2 + 2 + 2 blocks of prompt; 10 blocks cannot hold three sequences of ~26 tokens (7 blocks each), and with a
    # small batch the waiting ones hold blocks the running one needs.
    tight = _engine(model, num_blocks=10, max_batch_size=max_batch_size)
    got, free = _run(tight, [_seq(model, tight, f"r{i}", p, 20) for i, p in enumerate(prompts)])
    assert tight.num_preempted > 0 or max_batch_size == 1
    assert got == want
    assert free[-1] == 10


def test_step_budget_bounds_the_batch(model):
    # Predicted step: 10 ms per sequence; a 25 ms budget admits two of three.
    engine = _engine(model, predict_step_s=lambda n, ctx: 0.01 * n, step_budget_s=0.025)
    seqs = [_seq(model, engine, f"r{i}", [3, 4, 5], 4) for i in range(3)]
    engine.step(seqs, set())
    assert engine.num_running == 2 and engine.num_waiting == 1
    assert engine.predicted_step_s() == pytest.approx(0.02)
    # One alone always runs, whatever the budget.
    lone = _engine(model, predict_step_s=lambda n, ctx: 1.0, step_budget_s=0.025)
    lone.step([_seq(model, lone, "x", [3, 4, 5], 4)], set())
    assert lone.num_running == 1


def test_a_preempted_sequence_waiting_for_blocks_lets_block_holders_pass(model):
    engine = _engine(model, num_blocks=5, max_batch_size=2)
    b = _seq(model, engine, "b", list(range(30, 40)), 6)  # 10 tokens: 3 blocks
    engine._preempt(b)  # as if pushed out earlier: its KV copied out, its blocks free
    c = _seq(model, engine, "c", list(range(50, 59)), 6)  # 9 tokens: 3 of the 5 blocks
    # b (first in line) needs 3 blocks and only 2 are free: c, which holds its blocks, goes first.
    out, free = _run(engine, [b, c])
    assert set(out) == {"b", "c"} and free[-1] == 5
    roomy = _engine(model)
    want, _ = _run(roomy, [_seq(model, roomy, "b", list(range(30, 40)), 6)])
    assert out["b"] == want["b"]

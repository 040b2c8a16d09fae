"""KV packing, sampling, the decode engine's finish rules: torch, no bus."""

import pytest
import torch

from tsukimi.common.messages import DecodeTask, GenerateRequest, KVLayout, SamplingParams
from tsukimi.decode.engine import DecodeEngine
from tsukimi.model.kv import layout_of, pack, unpack
from tsukimi.model.loader import build_demo_model
from tsukimi.model.sampler import sample, sample_batch
from tsukimi.prefill.engine import PrefillEngine

TINY = {"vocab_size": 257, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "eos_token_id": 256,
        "initializer_range": 0.2}


@pytest.fixture(scope="module")
def tiny():
    return build_demo_model(TINY, seed=7)


def test_pack_unpack_roundtrip():
    layers = [(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) for _ in range(3)]
    layout, flat = pack(layers)
    assert (layout.num_layers, layout.num_kv_heads, layout.seq_len, layout.head_dim) == (3, 2, 5, 4)
    assert flat.numel() == layout.num_bytes == 3 * 2 * 2 * 5 * 4 * 4
    back = unpack(layout, bytearray(flat.numpy().tobytes()))
    for (k, v), (k2, v2) in zip(layers, back):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(ValueError):
        unpack(layout, bytearray(10))


def test_same_seed_and_index_same_token_and_greedy_is_argmax():
    logits = torch.randn(257)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    assert sample(logits, params, 3) == sample(logits, params, 3)
    draws = {sample(logits, params, i) for i in range(50)}
    assert len(draws) > 1
    assert sample(logits, SamplingParams(temperature=0), 0) == int(logits.argmax())


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([10.0, 9.0, -10.0, -10.0])
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=1)
    assert {sample(logits, params, i) for i in range(100)} == {0}


def test_batch_sampling_uses_each_rows_settings():
    logits = torch.randn(3, 257)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0)]
    out = sample_batch(logits, params, [0, 4, 0])
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())
    assert out[1] == sample(logits[1], params[1], 4)


def _task(rid, prompt, first, max_tokens, stop_ids=()):
    req = GenerateRequest(request_id=rid, model="demo", prompt_token_ids=prompt, arrival_time=0.0,
                          sampling=SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=list(stop_ids)))
    # The engine reads the KV from the sequence; the layout only describes the bytes prefill delivered.
    layout = KVLayout(num_layers=2, num_kv_heads=2, seq_len=len(prompt), head_dim=16, dtype="float32")
    return DecodeTask(request=req, first_token_id=first, num_kv_tokens=len(prompt), kv_layout=layout)


def test_engine_finishes_on_length_and_frees(tiny):
    prefill, engine = PrefillEngine(tiny), DecodeEngine(tiny, max_batch_size=4, max_model_len=64)
    prompt = [1, 2, 3, 4]
    result = prefill.run(prompt)
    first = int(result.logits.argmax())
    seq = DecodeEngine.sequence_of(_task("a", prompt, first, max_tokens=4), result.kv)
    events, left = engine.step([seq], set())
    assert [e.index for e in events] == [1] and left == []
    engine.step([], set())
    events, left = engine.step([], set())
    assert events[0].index == 3 and events[0].finish_reason == "length" and left == ["a"]
    assert engine.num_running == 0 and engine.batch.num_kv_bytes() == 0


def test_engine_stops_on_stop_token_and_respects_batch_limit(tiny):
    prefill, engine = PrefillEngine(tiny), DecodeEngine(tiny, max_batch_size=2, max_model_len=64)
    seqs = []
    for i in range(3):
        prompt = [10 + i] * (3 + i)
        r = prefill.run(prompt)
        seqs.append(DecodeEngine.sequence_of(_task(f"r{i}", prompt, int(r.logits.argmax()), 50), r.kv))
    # Greedy next token of r0 is predictable: make it r0's stop token.
    events, _ = engine.step(seqs, set())
    assert engine.num_running == 2 and engine.num_waiting == 1
    assert {e.request_id for e in events} == {"r0", "r1"}
    events, left = engine.step([], {"r1"})
    assert "r1" in left and engine.num_running == 2  # r2 joined when r1 left
    assert {e.request_id for e in events} == {"r0", "r2"}
    engine2 = DecodeEngine(tiny, max_batch_size=2, max_model_len=64)
    r = prefill.run([5, 6, 7])
    probe = DecodeEngine(tiny, 1, 64)
    nxt, _ = probe.step([DecodeEngine.sequence_of(_task("p", [5, 6, 7], int(r.logits.argmax()), 50), r.kv)], set())
    stop_id = nxt[0].token_id
    r = prefill.run([5, 6, 7])
    events, left = engine2.step(
        [DecodeEngine.sequence_of(_task("s", [5, 6, 7], int(r.logits.argmax()), 50, [stop_id]), r.kv)], set())
    assert events[0].token_id == stop_id and events[0].finish_reason == "stop" and left == ["s"]


def test_layout_of_reports_dtype():
    layers = [(torch.zeros(1, 1, 2, 3, dtype=torch.bfloat16),) * 2]
    assert layout_of(layers).dtype == "bfloat16" and layout_of(layers).element_size == 2

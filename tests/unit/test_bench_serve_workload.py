"""`tsukimi bench serve`'s workload: prompt blocks from hash ids (shared ids, shared prefixes, ids in the
vocabulary), length scaling, and trace and synthetic schedules."""

import numpy as np
import pytest

from tsukimi.bench.serve_workload import (
    PromptMaker,
    scale_length,
    synthetic_schedule,
    trace_blocks,
    trace_schedule,
)


def row(ms, tokens, output, keys):
    return {"timestamp": ms, "input_length": tokens, "output_length": output, "hash_ids": list(keys)}


# ---- prompts from hash ids -----------------------------------------------------------------------------------


def test_equal_hash_ids_give_equal_blocks_and_different_ids_differ():
    a, b = PromptMaker(salt=7), PromptMaker(salt=7)
    assert np.array_equal(a.block(42, 10), b.block(42, 10))
    assert not np.array_equal(a.block(42, 10), a.block(43, 10))
    # A shorter block of the same id is a prefix of a longer one, whichever is drawn first.
    assert np.array_equal(a.block(5, 30)[:10], b.block(5, 10))
    assert np.array_equal(b.block(5, 30)[:10], a.block(5, 10))
    # Another salt: other blocks.
    assert not np.array_equal(PromptMaker(salt=8).block(42, 10), a.block(42, 10))


def test_token_ids_stay_in_the_vocabulary_and_avoid_eos():
    ids = np.concatenate([PromptMaker().block(h, 500) for h in range(20)])
    assert ids.min() >= 0 and ids.max() <= 255 and 256 not in ids
    assert len(set(ids.tolist())) == 256  # every byte shows up
    ids = np.concatenate([PromptMaker(vocab_size=300, avoid_ids=(256, 0)).block(h, 500) for h in range(20)])
    assert ids.max() <= 299 and 256 not in ids and 0 not in ids and ids.max() > 256


def test_shared_leading_hash_ids_give_a_shared_prefix():
    maker = PromptMaker(salt=1)
    p1 = maker.prompt(trace_blocks([1, 2, 3], 10, 30))
    p2 = maker.prompt(trace_blocks([1, 2, 4], 10, 25))
    assert len(p1) == 30 and len(p2) == 25
    assert p1[:20] == p2[:20] and p1[20:25] != p2[20:25]
    assert all(type(t) is int for t in p1)


def test_trace_blocks_cover_the_scaled_length():
    assert trace_blocks([1, 2, 3], 10, 30) == [(1, 10), (2, 10), (3, 10)]
    # The last id takes what is left, more or less than a block.
    assert trace_blocks([1, 2, 3], 10, 27) == [(1, 10), (2, 10), (3, 7)]
    assert trace_blocks([1, 2, 3], 10, 33) == [(1, 10), (2, 10), (3, 13)]
    assert trace_blocks([1, 2, 3], 10, 12) == [(1, 10), (2, 2)]


# ---- scaling and schedules -----------------------------------------------------------------------------------


def test_length_scaling_rounds_and_keeps_one_token():
    assert scale_length(15325, 0.02) == 307  # 306.5 rounds half up
    assert scale_length(512, 0.02) == 10
    assert scale_length(6, 0.02) == 1 and scale_length(1, 0.001) == 1
    assert scale_length(149, 0.02) == 3


def test_trace_schedule_scales_times_and_lengths():
    trace = [row(2000, 1024, 100, [1, 2]), row(0, 512, 49, [1]), row(3000, 600, 10, [3, 4])]
    s = trace_schedule(trace, PromptMaker(salt=3), rate_scale=2.0, length_scale=0.02)
    assert [r.arrival_s for r in s.requests] == [0.0, 1.0, 1.5]  # sorted, divided by the rate scale
    assert [len(r.prompt) for r in s.requests] == [10, 20, 12]
    assert [r.max_tokens for r in s.requests] == [1, 2, 1]
    assert [r.index for r in s.requests] == [0, 1, 2]
    assert s.requests[0].prompt == s.requests[1].prompt[:10]  # hash id 1 leads both
    # 3 arrivals over 1.5 s: 2 gaps of 0.75 s on average, so the window runs one more gap and the rate is 4/3.
    assert s.window_s == 2.25 and s.offered_rate == pytest.approx(4 / 3)
    # Outputs may scale on their own.
    s = trace_schedule(trace, PromptMaker(salt=3), length_scale=0.02, output_scale=0.1)
    assert [len(r.prompt) for r in s.requests] == [10, 20, 12]
    assert [r.max_tokens for r in s.requests] == [5, 10, 1]


def test_trace_schedule_limit_and_duration_in_replay_time():
    trace = [row(t * 1000, 512, 50, [t]) for t in range(10)]
    s = trace_schedule(trace, PromptMaker(), rate_scale=2.0, length_scale=0.02, duration_s=2.0)
    assert [r.arrival_s for r in s.requests] == [0.0, 0.5, 1.0, 1.5]
    assert s.window_s == 2.0 and s.offered_rate == 2.0
    s = trace_schedule(trace, PromptMaker(), length_scale=0.02, limit=3)
    assert [r.arrival_s for r in s.requests] == [0.0, 1.0, 2.0]


def test_synthetic_schedule_poisson_lengths_and_shared_prefix():
    maker = PromptMaker(salt=0)
    s = synthetic_schedule(maker, rate=5.0, input_len=100, output_len=8, prefix_ratio=0.5, duration_s=200.0, seed=1)
    gaps = np.diff([r.arrival_s for r in s.requests])
    assert s.requests[0].arrival_s == 0.0 and all(r.arrival_s < 200.0 for r in s.requests)
    assert abs(len(s.requests) / 200.0 - 5.0) < 0.5 and abs(gaps.mean() - 0.2) < 0.02
    assert all(len(r.prompt) == 100 and r.max_tokens == 8 for r in s.requests)
    first, second = s.requests[0].prompt, s.requests[1].prompt
    assert first[:50] == second[:50] and first[50:] != second[50:]
    again = synthetic_schedule(PromptMaker(salt=0), rate=5.0, input_len=100, output_len=8, prefix_ratio=0.5,
                               duration_s=200.0, seed=1)
    assert [r.arrival_s for r in again.requests] == [r.arrival_s for r in s.requests]
    ranged = synthetic_schedule(maker, rate=5.0, input_len=100, output_len=10, range_ratio=0.5, limit=200, seed=2)
    lengths = [len(r.prompt) for r in ranged.requests]
    assert len(ranged.requests) == 200 and min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 20
    assert all(5 <= r.max_tokens <= 15 for r in ranged.requests)

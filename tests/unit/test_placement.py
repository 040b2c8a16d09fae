"""Placement (the paper's Algorithm 1 and the comparison policies) and early rejection. Exact expectations with
a simple cost model: prefill 1 ms per new token, decode step 10 ms + 1 ms per sequence."""

import pytest

from tsukimi.common.cost_model import CostModel
from tsukimi.conductor.cluster import DecodeEntry, DecodeInstance, PrefillInstance
from tsukimi.conductor.placement import PlacementConfig, Placer, Request

COST = CostModel(prefill_per_token_s=0.001, decode_base_s=0.010, decode_per_seq_s=0.001, kv_bytes_per_token=1000)
BLOCK = 100


def cluster(num_prefill=3, num_decode=2):
    prefills = [PrefillInstance(f"p{i}", COST) for i in range(num_prefill)]
    decodes = [DecodeInstance(f"d{i}", COST, max_batch_size=4, num_kv_tokens=10_000) for i in range(num_decode)]
    return prefills, decodes


def placer(**kw):
    return Placer(PlacementConfig(block_tokens=BLOCK, transfer_bytes_per_s=1e9, balance_threshold_blocks=1,
                                  ttft_slo_s=10, tbt_slo_s=1, **kw))


REQ = Request("r1", num_prompt_tokens=1000, num_output_tokens=10, block_keys=tuple(range(10)))


def test_mooncake_takes_the_smallest_ttft_counting_queue_prefix_and_transfer():
    prefills, decodes = cluster()
    prefills[0].busy_until = 0.5  # p0 holds 8 blocks but is busy
    holdings = {"p0": 8, "p1": 2}
    d = placer().place(REQ, 0.0, prefills, decodes, holdings)
    # p0: 0.5 queue + 200 new tokens = 0.7 s. p1: fetch 6 blocks (600 tok * 1000 B / 1e9 = 0.0006 s) + 0.2 s.
    # p2: fetch 8 blocks (0.0008 s) + 0.2 s. p1 wins.
    assert (d.prefill_id, d.num_reused_blocks, d.fetch_from) == ("p1", 8, "p0")
    assert d.predicted_ttft_s == pytest.approx(0.2006)
    assert d.alternates == ["p2", "p0"]
    assert (d.decode_id, d.predicted_tbt_s) == ("d0", pytest.approx(0.011))


def test_local_cache_ignores_remote_prefixes_and_least_loaded_ignores_caches():
    prefills, decodes = cluster()
    prefills[0].busy_until = 0.5
    holdings = {"p0": 8, "p1": 2}
    d = placer(policy="local-cache").place(REQ, 0.0, prefills, decodes, holdings)
    # p0: 0.7; p1: 0.8 (its own 2 blocks); p2: 1.0.
    assert (d.prefill_id, d.num_reused_blocks, d.fetch_from) == ("p0", 8, "")
    assert d.predicted_ttft_s == pytest.approx(0.7)
    prefills[1].busy_until = 0.1
    d = placer(policy="least-loaded").place(REQ, 0.0, prefills, decodes, holdings)
    assert (d.prefill_id, d.num_reused_blocks) == ("p2", 0) and d.predicted_ttft_s == pytest.approx(1.0)


def test_a_remote_prefix_within_the_balancing_threshold_is_recomputed():
    prefills, decodes = cluster()
    d = placer().place(REQ, 0.0, prefills, decodes, {"p0": 3, "p1": 2})
    # Equal queues: p0 (3 own blocks, 0.7 s) beats p1 and p2; p1 would not fetch 1 block (threshold 1).
    assert (d.prefill_id, d.fetch_from) == ("p0", "")
    assert d.alternates == ["p2", "p1"] or d.alternates == ["p1", "p2"]


def test_round_robin_and_random_cycle_and_reuse_only_their_own_prefix():
    prefills, decodes = cluster()
    p = placer(policy="round-robin")
    chosen = [p.place(REQ, 0.0, prefills, decodes, {"p1": 5}) for _ in range(4)]
    assert [d.prefill_id for d in chosen] == ["p0", "p1", "p2", "p0"]
    assert [d.num_reused_blocks for d in chosen] == [0, 5, 0, 0]
    a = [placer(policy="random", seed=3).place(REQ, 0.0, prefills, decodes, {}).prefill_id for _ in range(3)]
    b = [placer(policy="random", seed=3).place(REQ, 0.0, prefills, decodes, {}).prefill_id for _ in range(3)]
    assert a == b


def test_commit_books_queue_and_decode_entry():
    prefills, decodes = cluster()
    p = placer()
    d = p.place(REQ, 1.0, prefills, decodes, {})
    p.commit(REQ, d, 1.0, {x.instance_id: x for x in prefills}, {x.instance_id: x for x in decodes})
    assert prefills[0].busy_until == pytest.approx(2.0) and prefills[0].num_queued == 1
    entry = decodes[0].entries["r1"]
    # It reaches decode after its prefill and the KV hand-over (1000 tokens x 1000 B at 1e9 B/s = 1 ms).
    assert d.predicted_handover_s == pytest.approx(0.001)
    assert (entry.num_context_tokens, entry.start_at) == (1010, pytest.approx(2.001))
    assert entry.finish_at == pytest.approx(2.001 + 9 * 0.011)
    assert decodes[0].load_at(2.05) == (1, 1010) and decodes[0].load_at(1.5) == (0, 0)


def test_early_rejection_on_ttft_and_prediction_based_rejection_on_future_decode_load():
    prefills, decodes = cluster(num_prefill=1, num_decode=1)
    prefills[0].busy_until = 20.0
    d = placer(rejection="early").place(REQ, 0.0, prefills, decodes, {})
    assert d.rejected == "ttft_slo"
    prefills[0].busy_until = 0.0
    # Decode is full now (4 running) but they all finish before this request's prefill ends (1 s).
    for i in range(4):
        decodes[0].add(f"x{i}", DecodeEntry(100, 0.0, 0.5))
    tight = dict(rejection="early")
    d = Placer(PlacementConfig(block_tokens=BLOCK, tbt_slo_s=0.012, **tight)).place(REQ, 0.0, prefills, decodes, {})
    # Early rejection looks at the load now: no batch slot.
    assert d.rejected == "decode_full"
    d = Placer(PlacementConfig(block_tokens=BLOCK, tbt_slo_s=0.012, rejection="predicted")).place(
        REQ, 0.0, prefills, decodes, {})
    assert not d.is_rejected and d.predicted_tbt_s == pytest.approx(0.011)
    decodes[0].drop_started(0.0)
    for i in range(3):
        decodes[0].add(f"y{i}", DecodeEntry(100, 0.0, 5.0))  # still running at arrival: 4 sequences, 14 ms
    d = Placer(PlacementConfig(block_tokens=BLOCK, tbt_slo_s=0.012, rejection="predicted")).place(
        REQ, 0.0, prefills, decodes, {})
    assert d.rejected == "tbt_slo" and d.predicted_tbt_s == pytest.approx(0.014)


def test_a_prompt_past_the_measured_range_is_refused_only_on_a_linear_extrapolation():
    # Measured up to 1000 tokens: 1 ms per token + 10 us per pair (6 s at 1000 tokens).
    cost = CostModel(prefill_per_token_s=0.001, prefill_per_pair_s=1e-5, prefill_max_tokens=1000,
                     decode_base_s=0.010, kv_bytes_per_token=1000)
    prefills = [PrefillInstance("p0", cost)]
    decodes = [DecodeInstance("d0", cost, max_batch_size=4, num_kv_tokens=100_000)]
    slo = Placer(PlacementConfig(block_tokens=BLOCK, transfer_bytes_per_s=1e9, ttft_slo_s=30, rejection="early"))
    # 3000 tokens: the quadratic says 48 s; 3 x the edge's 6 s is 18 s: accepted, booked on the model's own 48 s.
    d = slo.place(Request("long", 3000, 10), 0.0, prefills, decodes, {})
    assert not d.is_rejected
    assert (d.predicted_ttft_s, d.judged_ttft_s, d.predicted_prefill_s) == (pytest.approx(48.0), pytest.approx(18.0),
                                                                            pytest.approx(48.0))
    # 6000 tokens: even the extrapolation (36 s) misses the SLO.
    d = slo.place(Request("longer", 6000, 10), 0.0, prefills, decodes, {})
    assert d.rejected == "ttft_slo" and d.judged_ttft_s == pytest.approx(36.0)
    # Within the range nothing changes: 1000 tokens behind a 25 s queue miss it by 1 s.
    prefills[0].busy_until = 25.0
    d = slo.place(Request("queued", 1000, 10), 0.0, prefills, decodes, {})
    assert d.rejected == "ttft_slo" and d.judged_ttft_s == d.predicted_ttft_s == pytest.approx(31.0)


def test_no_instances_is_no_capacity_and_bad_config_is_refused():
    assert placer().place(REQ, 0.0, [], [], {}).rejected == "no_capacity"
    with pytest.raises(ValueError):
        PlacementConfig(policy="best")

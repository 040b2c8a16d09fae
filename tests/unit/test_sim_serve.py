"""`tsukimi sim serve`: exact times on hand-made traces, prefix reuse, colocation's TBT hit, rejection, determinism,
the command line."""

import json
import random

import pytest

from tsukimi.cli import main
from tsukimi.common.cost_model import CostModel
from tsukimi.conductor.placement import PlacementConfig
from tsukimi.sim.disaggregated import DisaggregatedSim
from tsukimi.sim.outcome import tbt_of, token_times
from tsukimi.sim.serve import ServeConfig, simulate
from tsukimi.sim.workload import requests_from_trace

# Binary fractions: every time below is exact in floating point.
STEP = 2.0 ** -6  # decode step, whatever the batch
COST = CostModel(prefill_base_s=0.125, prefill_per_token_s=2.0 ** -10, decode_base_s=STEP, kv_bytes_per_token=0)


def row(ms, tokens, output, keys):
    return {"timestamp": ms, "input_length": tokens, "output_length": output, "hash_ids": list(keys)}


def disagg(trace, cost=COST, **kw):
    cfg = ServeConfig(**{"prefill": 1, "decode": 1, "sample_every_s": 0.0, **kw})
    return simulate(trace, cfg, cost, keep_requests=True)


def test_lone_request_ttft_is_its_prefill_and_tbt_the_step():
    result = disagg([row(0, 1024, 11, [1, 2])])
    r = result.requests[0]
    assert result.ttft[0] == 0.125 + 1024 * 2.0 ** -10  # prefill_s(1024, 0), exactly
    times = token_times(r)
    assert len(times) == 11 and [b - a for a, b in zip(times, times[1:])] == [STEP] * 10
    assert result.tbt[0] == STEP
    s = result.summary
    assert s["completed"] == 1 and s["effective_capacity"] == 1.0 and s["token_hit_ratio"] == 0.0
    assert s["prefill_compute_s"] == 1.125


def test_kv_handoff_delays_the_second_token_and_one_token_requests_have_tbt_zero():
    cost = CostModel(prefill_base_s=0.125, prefill_per_token_s=2.0 ** -10, decode_base_s=STEP, kv_bytes_per_token=1024)
    result = disagg([row(0, 1024, 3, [1, 2]), row(0, 512, 1, [7])], cost=cost, transfer_bytes_per_s=2.0 ** 20)
    a = token_times(result.requests[0])
    assert a[0] == 1.125 and a[1] - a[0] == 1.0 + STEP  # 1024 tokens x 1 KiB at 1 MiB/s, then a step
    assert result.tbt[0] == 1.0 + STEP  # 2 gaps: the longest one
    assert result.tbt[1] == 0.0 and result.requests[1].first_token_at == 1.125 + 0.125 + 0.5


def test_same_prefix_is_reused_shorter_prefill_and_hit_ratio():
    result = disagg([row(0, 1024, 2, [1, 2]), row(10_000, 1024, 2, [1, 2])])
    second = result.requests[1]
    assert second.reused_tokens == 1023  # one prompt token is always computed
    assert result.ttft[1] == 0.125 + 2.0 ** -10 < result.ttft[0]
    assert result.summary["token_hit_ratio"] == round(1023 / 2048, 4)


def test_remote_prefix_is_fetched_costed_and_then_held_by_the_fetcher():
    cost = CostModel(prefill_base_s=0.125, prefill_per_token_s=2.0 ** -10, decode_base_s=STEP, kv_bytes_per_token=64)
    keys = list(range(8))
    # A warms prefill-00 (done at 4.125). X and Y share A's 8 blocks: X goes to the holder (0.625 s); Y would queue
    # behind X there, so it goes to prefill-01 and fetches the prefix (4096 tokens x 64 B at 1 MiB/s = 0.25 s).
    trace = [row(0, 4096, 2, keys), row(5000, 4608, 2, [*keys, 100]), row(5000, 4608, 2, [*keys, 99])]
    system = DisaggregatedSim(cost, 2, 1, PlacementConfig(rejection="none", transfer_bytes_per_s=2.0 ** 20),
                              100_000, 8, 100_000)
    requests = requests_from_trace(trace)
    system.run(requests)
    _, x, y = requests
    assert (x.reused_tokens, x.fetched_tokens, x.first_token_at - x.arrival) == (4096, 0, 0.625)
    assert (y.reused_tokens, y.fetched_tokens, y.first_token_at - y.arrival) == (4096, 4096, 0.25 + 0.625)
    assert system.prefill_nodes[1].cache.num_leading([*keys, 99]) == 9  # the fetched prefix stays there


@pytest.mark.parametrize("view_refresh_s", [0.0, 0.5])
def test_conductor_view_matches_reality_after_the_run(view_refresh_s):
    rng = random.Random(1)
    trace = [row(i * 300, rng.randint(100, 3000), rng.randint(1, 40), [rng.randint(0, 5)] + [1000 + i])
             for i in range(60)]
    system = DisaggregatedSim(COST, 2, 2, PlacementConfig(rejection="none"), 10_000, 8, 100_000,
                              view_refresh_s=view_refresh_s)
    requests = requests_from_trace(trace)
    system.run(requests)
    assert all(r.done_at is not None for r in requests)
    assert all(not n.view.entries for n in system.decode_nodes)
    assert all(n.view.num_queued == 0 and n.view.busy_until <= system.clock.now for n in system.prefill_nodes)
    assert all(n.batch == 0 and n.context == 0 and n.reserved == 0 for n in system.decode_nodes)


def colocated(trace, **kw):
    cfg = ServeConfig(**{"colocated": True, "prefill": 1, "decode": 0, "sample_every_s": 0.0, **kw})
    return simulate(trace, cfg, COST, keep_requests=True)


def test_colocated_whole_prefill_stalls_the_running_decode():
    # A decodes from 1.125 on, one token per STEP; B arrives at 1.49 and its whole prefill (1.125 s) runs in the
    # step after the one ending at 1.5: A's gap there is B's prefill plus one decode step.
    result = colocated([row(0, 1024, 50, [1, 2]), row(1490, 1024, 5, [3, 4])])
    a = token_times(result.requests[0])
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert max(gaps) == 1.125 + STEP and gaps.count(STEP) == len(gaps) - 1
    assert result.requests[1].first_token_at == 1.5 + 1.125
    assert result.tbt[0] == (1.125 + STEP + 3 * STEP) / 4  # 49 gaps: the longest 4


def test_colocated_chunked_prefill_mixes_chunks_into_decode_steps():
    result = colocated([row(0, 1024, 50, [1, 2]), row(1490, 1024, 5, [3, 4])], chunked_prefill=512)
    a = token_times(result.requests[0])
    gaps = sorted({round(y - x, 12) for x, y in zip(a, a[1:])})
    # Two chunks of 512: the first one starts the forward (fixed cost), the second attends to 512 done tokens.
    assert gaps == [STEP, STEP + 0.125 + 0.5]
    assert result.requests[1].first_token_at == 1.5 + 2 * (STEP + 0.125 + 0.5)


def test_colocated_prefix_cache_reuses_on_the_same_instance():
    result = colocated([row(0, 1024, 2, [1, 2]), row(10_000, 1024, 2, [1, 2])], local_prefix_cache=True)
    assert result.requests[1].reused_tokens == 1023 and result.ttft[1] == 0.125 + 2.0 ** -10
    assert colocated([row(0, 1024, 2, [1, 2]), row(10_000, 1024, 2, [1, 2])]).requests[1].reused_tokens == 0


OVERLOAD = [row(0, 1024, 2, [i]) for i in range(10)]  # ten 1.125 s prefills at once on one node


@pytest.mark.parametrize("rejection,expected", [("none", 0), ("early", 8), ("predicted", 8)])
def test_rejection_counts_under_overload(rejection, expected):
    s = disagg(OVERLOAD, rejection=rejection, ttft_slo_s=3.0).summary
    assert s["rejected"] == expected and s["completed"] == 10 - expected
    if expected:
        assert s["rejected_by_reason"] == {"ttft_slo": expected}
    # Rejected requests fail (capacity is over all requests); without rejection, only two make the 3 s TTFT.
    assert s["effective_capacity"] == 0.2


def test_predicted_rejection_sees_the_decode_load_to_come():
    # Decode steps of 3+ sequences miss the 0.1 s TBT SLO. All six arrive at once: at that moment decode is empty
    # (early rejection admits all), but each will reach decode while the earlier ones still run there.
    cost = CostModel(prefill_base_s=0.125, prefill_per_token_s=2.0 ** -10, decode_base_s=STEP, decode_per_seq_s=0.03)
    trace = [row(0, 128, 100, [i]) for i in range(6)]
    runs = {rej: simulate(trace, ServeConfig(prefill=1, decode=1, rejection=rej, sample_every_s=0.0), cost).summary
            for rej in ("none", "early", "predicted")}
    assert runs["none"]["rejected"] == runs["early"]["rejected"] == 0
    assert runs["predicted"]["rejected_by_reason"] == {"tbt_slo": 4}
    assert runs["predicted"]["effective_capacity"] == pytest.approx(2 / 6, abs=1e-4)
    assert runs["none"]["effective_capacity"] < runs["predicted"]["effective_capacity"]


def test_colocated_early_rejection():
    s = colocated(OVERLOAD, rejection="early", ttft_slo_s=3.0).summary
    assert s["rejected"] == 8 and s["rejected_by_reason"] == {"ttft_slo": 8}


def test_tbt_is_the_mean_of_the_longest_tenth_of_gaps():
    assert tbt_of([0.0]) == 0.0
    assert tbt_of([0.0, 0.5]) == 0.5
    times = [0.0]
    for gap in [1.0, 2.0] + [0.25] * 18:  # 20 gaps: the longest 2
        times.append(times[-1] + gap)
    assert tbt_of(times) == 1.5


def random_trace(n=150, seed=3):
    rng = random.Random(seed)
    return [row(i * 250, rng.randint(10, 6000), rng.randint(1, 60), [rng.randint(0, 3), rng.randint(10, 12), i])
            for i in range(n)]


def test_same_inputs_same_outputs():
    for cfg in (ServeConfig(policy="random", prefill=3, decode=2), ServeConfig(colocated=True, chunked_prefill=256,
                                                                               local_prefix_cache=True)):
        a = simulate(random_trace(), cfg, COST)
        b = simulate(random_trace(), cfg, COST)
        assert a.summary == b.summary and a.samples == b.samples


def test_cli_json(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in random_trace(40)))
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"prefill_base_s": 0.01, "prefill_per_token_s": 1e-4, "decode_base_s": 0.01,
                                "kv_bytes_per_token": 1000, "source": "measured"}))
    argv = ["sim", "serve", "--trace", str(trace), "--prefill", "2", "--decode", "2", "--json", "--cost-model",
            str(cost), "--limit", "30"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    out = json.loads(first)
    for key in ("avg_ttft_s", "p50_ttft_s", "p90_ttft_s", "p99_ttft_s", "avg_tbt_s", "p50_tbt_s", "p90_tbt_s",
                "p99_tbt_s", "effective_capacity", "rejected", "rejected_by_reason", "token_hit_ratio",
                "prefill_compute_s", "completed", "config"):
        assert key in out
    assert out["num_requests"] == 30 and out["config"]["cost_model"] == "measured"
    assert main(argv) == 0 and capsys.readouterr().out == first  # deterministic, byte for byte
    assert main(["sim", "serve", "--trace", str(trace), "--colocated", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["colocated"] is True


def test_cli_compare_systems_draws_one_figure(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in random_trace(30)))
    assert main(["sim", "serve", "--trace", str(trace), "--compare", "systems", "--prefill", "1", "--decode", "1",
                 "--json", "--plot-dir", str(tmp_path / "plots")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["runs"]) == 4 and (tmp_path / "plots" / "compare_systems_capacity_1p1d_rate1.png").stat().st_size > 0


def test_a_request_with_no_decode_room_waits_for_it_with_decode_wait():
    # Each needs 515 KV tokens (512 + 3); the decode node holds 1000: the second one finds no room.
    trace = [row(0, 512, 3, [1]), row(0, 512, 3, [2])]
    rejected = disagg(trace, rejection="predicted", kv_tokens_per_instance=1000)
    assert rejected.summary["rejected_by_reason"] == {"decode_full": 1}
    waited = disagg(trace, rejection="predicted", kv_tokens_per_instance=1000, decode_wait_s=1.0)
    assert waited.summary["rejected"] == 0 and waited.summary["completed"] == 2
    assert waited.summary["counters"]["decode_waits"] == 1
    # Placed when the first one's last token is out (its prefill, then 2 steps), then its own prefill.
    assert waited.requests[1].first_token_at == (0.125 + 0.5) + 2 * STEP + (0.125 + 0.5)
    short = disagg(trace, rejection="predicted", kv_tokens_per_instance=1000, decode_wait_s=0.5)
    assert short.summary["rejected_by_reason"] == {"decode_full": 1} and short.summary["completed"] == 1

"""`tsukimi sim cache`: exact hit ratios on a small trace; the published trace's known figure."""

import json
import math
import os
import subprocess
import sys

import pytest

from tsukimi.sim.cache import simulate

TRACE = [
    {"input_length": 1000, "hash_ids": [1, 2]},        # miss, miss
    {"input_length": 1536, "hash_ids": [1, 2, 3]},     # hit 2 blocks = 1024 tokens
    {"input_length": 300, "hash_ids": [1]},            # hit, capped at 300 tokens
    {"input_length": 1024, "hash_ids": [9, 2]},        # a different first block: no prefix hit
]


def test_exact_ratios_unbounded():
    r = simulate(TRACE, math.inf, block_tokens=512)
    assert r["token_hit_ratio"] == round((1024 + 300) / (1000 + 1536 + 300 + 1024), 4)
    assert r["block_hit_ratio"] == round(3 / 8, 4)
    assert r["evictions"] == 0


def test_bounded_pool_evicts_lru_and_loses_hits():
    # Room for 2 blocks (watermark 90%: a third insert passes it and evicts).
    r = simulate(TRACE, 1024, block_tokens=512)
    assert r["evictions"] > 0
    assert r["token_hit_ratio"] < simulate(TRACE, math.inf, block_tokens=512)["token_hit_ratio"]


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "traces", "synthetic_trace.jsonl")


@pytest.mark.skipif(not os.path.exists(SHARED), reason="the published Mooncake trace is not next to this checkout")
def test_published_trace_unbounded_hit_ratio_is_0_651():
    out = subprocess.run([sys.executable, "-m", "tsukimi", "sim", "cache", "--trace", SHARED, "--json"],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["token_hit_ratio"] == pytest.approx(0.651, abs=0.0005)
    assert result["num_requests"] == 3993

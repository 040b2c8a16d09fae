"""The cost model: formulas, exact least-squares fits, non-negative coefficients, only the terms the samples
determine, predictions bounded by the measured range, the roofline model."""

import msgspec
import pytest

from tsukimi.common.cost_model import (
    CostModel, fit_decode, fit_error, fit_prefill, is_decode_determined, is_prefill_determined, roofline,
)
from tsukimi.common.messages import Heartbeat, PrefillStatus, decode, encode
from tsukimi.decode.calibration import DecodeCosts
from tsukimi.prefill.calibration import PrefillCosts


def test_formulas():
    m = CostModel(prefill_base_s=0.01, prefill_per_token_s=0.001, prefill_per_pair_s=1e-6, decode_base_s=0.02,
                  decode_per_seq_s=0.001, decode_per_context_token_s=1e-5)
    # 100 new after 50 reused: 0.01 + 0.1 + 1e-6 * 100 * (50 + 50) = 0.12
    assert m.prefill_s(100, 50) == pytest.approx(0.12)
    assert m.prefill_s(0, 50) == 0.0 and m.decode_step_s(0, 0) == 0.0
    assert m.decode_step_s(4, 1000) == pytest.approx(0.02 + 0.004 + 0.01)
    assert m.scaled(2.0, 0.5).prefill_s(100, 50) == pytest.approx(0.24)
    assert m.scaled(2.0, 0.5).decode_step_s(4, 1000) == pytest.approx(0.017)


def test_fits_recover_known_coefficients_exactly():
    truth = CostModel(prefill_base_s=0.02, prefill_per_token_s=7e-4, prefill_per_pair_s=5e-7, decode_base_s=0.015,
                      decode_per_seq_s=1e-3, decode_per_context_token_s=8e-6)
    shapes = [(16, 0), (64, 0), (256, 0), (64, 256), (512, 0), (16, 512)]
    assert fit_prefill([(n, r, truth.prefill_s(n, r)) for n, r in shapes]) == pytest.approx((0.02, 7e-4, 5e-7))
    steps = [(b, c) for b in (1, 4, 16) for c in (64 * b, 512 * b)]
    assert fit_decode([(b, c, truth.decode_step_s(b, c)) for b, c in steps]) == pytest.approx((0.015, 1e-3, 8e-6))


def test_fit_never_returns_a_negative_coefficient():
    # Times that fall with length (noise) would want a negative slope: that term is dropped instead.
    p0, p1, p2 = fit_prefill([(16, 0, 0.05), (64, 0, 0.04), (256, 0, 0.03)])
    assert min(p0, p1, p2) >= 0 and p0 > 0


def test_roofline_of_the_papers_setting():
    m = roofline("llama3-70b", "a800", 8)
    assert m.kv_bytes_per_token == 2 * 80 * 1024 * 2  # K and V, 80 layers, 8 KV heads x 128, bf16
    assert 1.0 < m.prefill_s(15_000) < 3.0  # a 15k-token prompt takes seconds
    assert 0.01 < m.decode_step_s(32, 32 * 15_000) < 0.1  # a loaded step stays in tens of milliseconds
    with pytest.raises(KeyError):
        roofline("llama3-70b", "tpu", 8)


def test_fewer_samples_than_terms_fit_only_the_terms_they_determine():
    # One timing: the fixed cost alone, never everything on the per-context-token term (a one-point fit put
    # 1,780 us/token there and predicted a 147 ms step at 2.78 s).
    assert fit_decode([(1, 65, 0.116)]) == pytest.approx((0.116, 0.0, 0.0))
    assert fit_prefill([(16, 0, 0.244)]) == pytest.approx((0.244, 0.0, 0.0))
    # Two: two terms fit exactly (on a tie the first pair: fixed + per sequence), the third stays 0.
    assert fit_decode([(1, 64, 0.02), (16, 1024, 0.05)]) == pytest.approx((0.018, 0.002, 0.0))
    assert not is_decode_determined([(1, 64, 0.02), (16, 1024, 0.05)])
    assert is_decode_determined([(1, 64, 0.02), (16, 1024, 0.05), (16, 8192, 0.2)])
    # Batches of one never tell the fixed cost from the per-sequence one.
    assert not is_decode_determined([(1, 64, 0.02), (1, 1024, 0.05), (1, 4096, 0.2)])
    assert is_prefill_determined([(16, 0, 0.02), (256, 0, 0.2), (1024, 0, 1.0)])
    assert not is_prefill_determined([(16, 0, 0.02), (16, 0, 0.03), (1024, 0, 1.0)])


def test_fits_minimise_the_relative_error():
    # Two noisy timings of the longest prompt: a plain least squares would follow them and predict the 16-token
    # prompt at 0.26x (with a negative fixed cost); relative to each timing, the short ones stay within 6%.
    samples = [(16, 0, 0.010), (64, 0, 0.020), (512, 0, 0.40), (1024, 0, 1.3), (1024, 0, 0.9)]
    p0, p1, p2 = fit_prefill(samples)
    model = CostModel(prefill_base_s=p0, prefill_per_token_s=p1, prefill_per_pair_s=p2)
    assert [round(model.prefill_s(n) / t, 2) for n, _, t in samples] == [0.98, 1.05, 0.80, 0.84, 1.21]
    worst, mean = fit_error(samples, model.prefill_s)
    assert worst == pytest.approx(0.2133, abs=1e-4) and mean == pytest.approx(0.1299, abs=1e-4)
    assert fit_error([(1, 0, 1.0), (2, 0, 4.0)], lambda n, r: 2.0 * n) == (1.0, 0.5)


def test_a_prediction_past_the_measured_range_is_bounded_by_a_linear_extrapolation():
    m = CostModel(prefill_base_s=0.01, prefill_per_token_s=0.001, prefill_per_pair_s=1e-5, prefill_max_tokens=1000)
    # Within the range: the model itself (0.01 + 1 + 1e-5 * 1000 * 500).
    assert m.bounded_prefill_s(1000) == m.prefill_s(1000) == pytest.approx(6.01)
    # 4x the range: 4 x the edge's 6.01 s, not the quadratic's 84.01 s.
    assert m.prefill_s(4000) == pytest.approx(84.01)
    assert m.bounded_prefill_s(4000) == pytest.approx(24.04)
    # After a reused prefix: the same prompt shrunk to the range (250 new after 750), times 4.
    assert m.bounded_prefill_s(1000, 3000) == pytest.approx(4 * m.prefill_s(250, 750)) == pytest.approx(9.79)
    # Never above the model (the fixed cost does not scale), nor bounded without a measured range.
    flat = CostModel(prefill_base_s=1.0, prefill_max_tokens=100)
    assert flat.bounded_prefill_s(200) == 1.0
    unranged = msgspec.structs.replace(m, prefill_max_tokens=0)
    assert unranged.bounded_prefill_s(4000) == unranged.prefill_s(4000)
    assert m.scaled(2.0).prefill_max_tokens == 1000


def test_the_fitted_range_is_what_was_measured_and_old_heartbeats_still_decode():
    prefill = PrefillCosts([(16, 0, 0.02), (256, 0, 0.2), (64, 960, 0.1)], 8192, refit_every=1)
    assert prefill.model.prefill_max_tokens == 1024
    prefill.observe(1500, 500, 2.0)
    assert prefill.model.prefill_max_tokens == 2000
    decode_costs = DecodeCosts([(1, 64, 0.01), (16, 1024, 0.03), (16, 8192, 0.1)], 8192)
    assert (decode_costs.model.decode_max_batch_size, decode_costs.model.decode_max_context_tokens) == (16, 8192)
    assert decode_costs.error[0] == pytest.approx(0.0, abs=1e-9)
    # A heartbeat of a version without the range decodes with none (no bound).
    beat = Heartbeat(instance_id="p", status=PrefillStatus(), model="m", cost_model=prefill.model)
    raw = msgspec.msgpack.decode(encode(beat))
    for field in ("prefill_max_tokens", "decode_max_batch_size", "decode_max_context_tokens"):
        del raw["cost_model"][field]
    old = decode(msgspec.msgpack.encode(raw), Heartbeat).cost_model
    assert old.prefill_max_tokens == 0 and old.bounded_prefill_s(4000) == old.prefill_s(4000)
    assert decode(encode(beat), Heartbeat).cost_model == prefill.model

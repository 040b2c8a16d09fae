"""The cost model: formulas, exact least-squares fits, non-negative coefficients, the roofline model."""

import pytest

from tsukimi.common.cost_model import CostModel, fit_decode, fit_prefill, roofline


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

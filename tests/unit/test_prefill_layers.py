"""Prefill's layer-wise reporting and stopping: each layer's whole KV is reported once, in order, as it finishes;
a stop request ends the prefill between layers or chunks."""

import pytest
import torch

from tsukimi.model.loader import build_demo_model
from tsukimi.prefill.engine import PrefillEngine, PrefillStopped
from tests.unit.tiny_model import TINY


@pytest.fixture(scope="module")
def model():
    return build_demo_model(TINY, seed=7)


@pytest.mark.parametrize("chunk_tokens", [0, 4])
def test_each_layer_is_reported_once_with_its_whole_kv(model, chunk_tokens):
    prompt = list(range(30, 41))
    plain = PrefillEngine(model).run(prompt)
    seen = []
    result = PrefillEngine(model, chunk_tokens).run(
        prompt, on_layer=lambda i, k, v: seen.append((i, k.clone(), v.clone())))
    assert [i for i, _, _ in seen] == [0, 1]
    for (i, k, v), (k_ref, v_ref) in zip(seen, plain.kv):
        assert k.shape == (1, 2, 11, 16) and torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)
    assert torch.equal(result.logits.argmax(), plain.logits.argmax())


def test_stop_between_layers_and_chunks(model):
    def stop_at(n: int):
        calls = []

        def should_stop() -> bool:
            calls.append(1)
            return len(calls) >= n

        return should_stop

    # Asked before the forward, then after layers 0 and 1.
    with pytest.raises(PrefillStopped, match="layer 1"):
        PrefillEngine(model).run(list(range(20)), should_stop=stop_at(3))
    # Chunks of 4: asked before chunk 0, after its two layers, then before chunk 1.
    with pytest.raises(PrefillStopped, match="chunk at token 4"):
        PrefillEngine(model, 4).run(list(range(20)), should_stop=stop_at(4))
    # The model reports to nobody once a prefill ended, whichever way.
    assert model._tsukimi_layer_listener is None

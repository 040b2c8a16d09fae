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


def test_a_shared_forward_reports_each_prompts_layers_and_stops_one_alone(model):
    plain = PrefillEngine(model)
    engine = PrefillEngine(model, 6)
    prompts = [list(range(30, 41)), list(range(50, 54)), list(range(70, 79))]
    seen = {0: [], 1: [], 2: []}
    asked = []

    def stop_third() -> bool:
        asked.append(1)
        return len(asked) >= 2  # asked before the forward, then stops after layer 0

    jobs = [engine.start(p, on_layer=lambda i, k, v, j=j: seen[j].append((i, k.clone())),
                         should_stop=stop_third if j == 2 else None) for j, p in enumerate(prompts)]
    engine.step([(jobs[0], 6)])
    stopped = engine.step([(jobs[0], 5), (jobs[1], 4), (jobs[2], 9)])
    assert list(stopped) == [jobs[2]] and "layer 0" in str(stopped[jobs[2]])
    assert jobs[2].result is None and jobs[2]._cache is None
    # Each finishing prompt's layers are reported once, in order, with its whole KV; the stopped one reports none.
    assert [i for i, _ in seen[0]] == [0, 1] and [i for i, _ in seen[1]] == [0, 1] and seen[2] == []
    for j in (0, 1):
        ref = plain.run(prompts[j])
        assert torch.equal(jobs[j].result.logits.argmax(), ref.logits.argmax())
        for (i, k), (k_ref, _) in zip(seen[j], ref.kv):
            assert k.shape == k_ref.shape and torch.allclose(k, k_ref, atol=1e-5)
    assert model._tsukimi_layer_listener is None


def test_a_shared_forward_whose_prompts_all_stop_ends_early(model):
    def stop_at_second_ask():
        asked = []
        return lambda: asked.append(1) or len(asked) >= 2  # before the forward, then after layer 0

    engine = PrefillEngine(model, 8)
    jobs = [engine.start(list(range(10, 20)), should_stop=stop_at_second_ask()) for _ in range(2)]
    layer_1_runs = []
    hook = model.get_decoder().layers[1].register_forward_hook(lambda *args: layer_1_runs.append(1))
    try:
        stopped = engine.step([(jobs[0], 8), (jobs[1], 8)])
    finally:
        hook.remove()
    assert set(stopped) == set(jobs) and all("layer 0" in str(e) for e in stopped.values())
    assert layer_1_runs == [] and all(job.num_computed == 0 and job.result is None for job in jobs)

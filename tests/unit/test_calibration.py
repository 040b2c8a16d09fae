"""Workers' cost models: start-up calibration times shapes that determine every term and predicts shapes it did
not time (the demo model, a Qwen2 checkpoint, and a slow model whose budget allows one timing), online refits
follow the machine, and the heartbeats publish the model, the host and the predicted load.

Predictions are checked within FACTOR (2x) of the fastest / slowest of a few runs of the shape, at the machine's
speed during calibration or around the check: on this loaded 2-core machine (other engineers' processes) the same
1,024-token prefill took 0.9 s, 2.7 s and 6.3 s within minutes, so the demo model and the Qwen2 checkpoint also
re-time their longest calibrated shape before and after the check and allow for that drift; the slow model's
times are its sleeps and need no such allowance.
"""

import random
import socket
import time

import pytest
import torch

from tsukimi.common.cost_model import CostModel, is_decode_determined, is_prefill_determined
from tsukimi.common.messages import (
    GenerateRequest, Heartbeat, PrefillTask, SamplingParams, TaskAck, decode, encode,
)
from tsukimi.common.settings import Settings
from tsukimi.decode import calibration as decode_calibration
from tsukimi.decode.calibration import DecodeCosts, time_steps
from tsukimi.decode.engine import DecodeEngine
from tsukimi.decode.kv_blocks import KVBlocks
from tsukimi.decode.step_cache import StepCache
from tsukimi.model.kv import block_layout
from tsukimi.decode.service import DecodeService
from tsukimi.model.loader import build_demo_model, load_model
from tsukimi.model.spec import DEMO_CONFIG
from tsukimi.prefill import calibration as prefill_calibration
from tsukimi.prefill.calibration import PrefillCosts
from tsukimi.prefill.engine import PrefillEngine
from tsukimi.prefill.service import PrefillService

from tests.e2e.checkpoints import build_qwen2_checkpoint

MAX_LEN = 4096
FACTOR = 2.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, like a worker (`torch_threads`): timings are steadier when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return build_demo_model()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("qwen2"))
    build_qwen2_checkpoint(directory)
    return load_model(directory)


def _engine(model, max_batch_size: int, max_len: int = MAX_LEN, num_blocks: int = 256) -> DecodeEngine:
    return DecodeEngine(model, max_batch_size, max_len, KVBlocks(block_layout(model, 16), num_blocks))


def coefficients(m: CostModel) -> list[float]:
    return [m.prefill_base_s, m.prefill_per_token_s, m.prefill_per_pair_s, m.decode_base_s, m.decode_per_seq_s,
            m.decode_per_context_token_s]


def within(predicted: float, runs: list[float], factor: float = FACTOR,
           drift: tuple[float, ...] = (1.0,)) -> bool:
    """`predicted` within `factor` of the fastest and the slowest of `runs`, at any of the machine's speeds
    `drift` (now / during calibration)."""
    return min(runs) / factor <= predicted * max(drift) and predicted * min(drift) <= max(runs) * factor


def prefill_runs(engine: PrefillEngine, new: int, reused: int, num_runs: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    prompt = [rng.randrange(257) for _ in range(new + reused)]
    prefix = [(k[:, :, :reused].contiguous(), v[:, :, :reused].contiguous())
              for k, v in engine.run(prompt[:reused + 1]).kv] if reused else None
    runs = []
    for _ in range(num_runs):
        started = time.perf_counter()
        engine.run(prompt, prefix)
        runs.append(time.perf_counter() - started)
    return runs


# Unseen prompt shapes (new, reused, runs) per model: the demo's 1,500 tokens lie past its 1,024-token range.
UNSEEN_PROMPTS = {"demo": ((384, 0, 3), (96, 160, 3), (1500, 0, 2)), "qwen2": ((384, 0, 3), (96, 160, 3),
                                                                               (700, 200, 2))}
# Unseen decode configurations (batch, context per sequence) of a 16-sequence engine over 16,384 tokens of KV.
UNSEEN_BATCHES = ((8, 256), (2, 128), (12, 1000))


@pytest.mark.parametrize("name", ["demo", "qwen2"])
def test_prefill_calibration_predicts_unseen_prompts(request, name):
    model = request.getfixturevalue("model" if name == "demo" else "qwen2")
    max_len = MAX_LEN if name == "demo" else 1024
    engine = PrefillEngine(model)
    costs = prefill_calibration.measure(engine, max_len)
    m = costs.model
    assert m.source == "measured" and all(c >= 0 for c in coefficients(m)) and m.prefill_per_token_s > 0
    assert is_prefill_determined(costs.calibration)
    assert m.prefill_max_tokens == min(prefill_calibration.SPAN_TOKENS, max_len - 1)
    assert costs.error[0] < 1.0  # every calibration shape within 2x of its fit
    span_new, _, span_s = max(costs.calibration, key=lambda sample: sample[0])
    drift = [1.0, prefill_runs(engine, span_new, 0, 1)[0] / span_s]
    checks = [(new, reused, prefill_runs(engine, new, reused, num_runs)) for new, reused, num_runs in
              UNSEEN_PROMPTS[name]]
    drift.append(prefill_runs(engine, span_new, 0, 1)[0] / span_s)
    for new, reused, runs in checks:
        for predicted in (m.prefill_s(new, reused), m.bounded_prefill_s(new, reused)):
            assert within(predicted, runs, drift=tuple(drift)), (name, new, reused, predicted, runs, drift)


def test_prefill_kv_bytes_per_token(model):
    assert prefill_calibration.kv_bytes_per_token(PrefillEngine(model)) == 2 * 8 * 2 * 64 * 4


def test_prefill_calibration_times_the_determining_shapes_whatever_the_budget(model):
    engine = PrefillEngine(model)
    # No budget: the three fresh prompts that determine the model, nothing more (a one-point fit is never made).
    samples = prefill_calibration.calibrate(engine, MAX_LEN, budget_s=0)
    assert [(n, r) for n, r, _ in samples] == [(16, 0), (256, 0), (1024, 0)]
    assert is_prefill_determined(samples)
    # A short context caps every shape; the extra ones (reused prefixes among them) follow within the budget.
    samples = prefill_calibration.calibrate(engine, 41)
    assert sorted((n, r) for n, r, _ in samples) == [(2, 0), (2, 37), (5, 5), (10, 0), (10, 20), (20, 0), (40, 0)]
    assert all(t > 0 for _, _, t in samples)


# The slow model's seconds per forward: prefill base + per new token + per pair, decode base + per sequence + per
# context token (~4 and ~10 times the demo model's on a quiet core).
SLOW_PREFILL = (0.3, 1e-3, 2e-7)
SLOW_DECODE = (0.3, 0.01, 2e-5)


def slow(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with each forward sleeping first in proportion to its work (SLOW_PREFILL, SLOW_DECODE): a model
    slow enough that the old calibration's 2.5 s budget allowed one timing (its first shape, 0.3 s a run, then
    an estimate of 4x that for the next), whose true costs are known."""
    forward = model.forward

    def slow_forward(input_ids=None, cache=None, **kwargs):
        rows, new = input_ids.shape
        if isinstance(cache, StepCache):
            context = int(cache.mask.sum()) - rows
            base, per_seq, per_context = SLOW_DECODE
            seconds = base + per_seq * rows + per_context * context
        else:
            reused = cache.get_seq_length() if cache is not None else 0
            base, per_token, per_pair = SLOW_PREFILL
            seconds = base + per_token * new + per_pair * new * (reused + new / 2)
        time.sleep(seconds)
        return forward(input_ids=input_ids, cache=cache, **kwargs)

    model.forward = slow_forward
    return model


@pytest.fixture(scope="module")
def slow_model():
    config = {**DEMO_CONFIG, "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    return slow(build_demo_model(config))


def test_a_slow_model_still_gets_every_term_and_a_1500_token_prompt_within_the_factor(slow_model):
    engine = PrefillEngine(slow_model)
    costs = prefill_calibration.measure(engine, MAX_LEN)
    # The three determining prompts, past the budget; no extra shape fits in it.
    assert [(n, r) for n, r, _ in costs.calibration] == [(16, 0), (256, 0), (1024, 0)]
    assert is_prefill_determined(costs.calibration)
    m = costs.model
    runs = prefill_runs(engine, 1500, 0, 1)
    # Past the 1,024-token range: both the model and the bound a refusal uses stay within the factor (a one-point
    # fit put all of 0.3 s on 16 tokens: 28 s for these 1,500).
    assert within(m.prefill_s(1500), runs) and within(m.bounded_prefill_s(1500), runs), (m, runs)
    assert m.bounded_prefill_s(1500) <= m.prefill_s(1500)


def test_a_slow_model_still_gets_every_decode_term_and_a_bounded_16x2048_step(slow_model):
    costs = decode_calibration.measure(_engine(slow_model, 16))
    samples = costs.calibration
    assert [b for b, _, _ in samples] == [1, 16, 16] and is_decode_determined(samples)
    m = costs.model
    # 16 x 2,048 tokens: 8 times the context calibrated (16 x 256), predicted within the factor of a real step.
    batch, context, measured = time_steps(slow_model, block_layout(slow_model, 16), 16, 2048)
    assert within(m.decode_step_s(batch, context), [measured]), (m, measured)


def test_the_determining_shapes_shrink_only_past_the_time_cap():
    # 1,024 tokens after 256 took 1 s: 4 s (one run) fits in 30; after 10 s: 40 s does not, 512 (20 s) does;
    # never below twice the previous length.
    assert prefill_calibration._shrunk(1024, (256, 0, 1.0), 30.0) == 1024
    assert prefill_calibration._shrunk(1024, (256, 0, 10.0), 30.0) == 512
    assert prefill_calibration._shrunk(1024, (256, 0, 100.0), 30.0) == 512
    # 32 x 1,024 after 32 x 65 took 90 ms: at most 15.75 x that a step, 2 steps: 2.8 s. After 2 s a step: 63 s
    # at 1,024 each, 31.5 s at 512, 15.8 s at 256.
    assert decode_calibration._shrunk(32, 1024, (32, 32 * 65, 0.09), 30.0) == 1024
    assert decode_calibration._shrunk(32, 1024, (32, 32 * 65, 2.0), 30.0) == 256
    assert decode_calibration._shrunk(32, 1024, (32, 32 * 65, 100.0), 30.0) == 128


def test_prefill_refit_follows_slower_observations():
    truth = CostModel(prefill_base_s=0.01, prefill_per_token_s=0.001, prefill_per_pair_s=1e-6)
    calibration = [(n, r, truth.prefill_s(n, r)) for n, r in ((16, 0), (64, 0), (256, 0), (64, 256), (512, 0))]
    costs = PrefillCosts(calibration, kv_bytes_per_token=8192, window=64, refit_every=8)
    assert costs.model.prefill_s(128) == pytest.approx(truth.prefill_s(128), rel=1e-6)
    before = costs.model
    for i in range(7):
        costs.observe(32 + 40 * i, 0, 2 * truth.prefill_s(32 + 40 * i))
    assert costs.model is before  # not refitted yet
    costs.observe(100, 50, 2 * truth.prefill_s(100, 50))
    assert costs.model is not before
    for n in (50, 200):
        assert costs.model.prefill_s(n) > 1.25 * before.prefill_s(n)
    # A full window of slow runs outweighs the calibration: nearly 2x everywhere.
    for i in range(64):
        costs.observe(20 + 8 * i, 0, 2 * truth.prefill_s(20 + 8 * i))
    assert costs.model.prefill_s(300) == pytest.approx(2 * truth.prefill_s(300), rel=0.15)
    assert costs.model.source == "measured" and costs.model.kv_bytes_per_token == 8192
    assert len(costs.recent) == 64


@pytest.mark.parametrize("name", ["demo", "qwen2"])
def test_decode_calibration_predicts_unseen_batches(request, name):
    model = request.getfixturevalue("model" if name == "demo" else "qwen2")
    max_len = MAX_LEN if name == "demo" else 1024
    costs = decode_calibration.measure(_engine(model, 16, max_len, num_blocks=1024))
    m = costs.model
    assert m.source == "measured" and all(c >= 0 for c in coefficients(m))
    assert m.decode_base_s + m.decode_per_seq_s > 0
    assert is_decode_determined(costs.calibration)
    # The range spans the largest batch over the whole arena (16,384 tokens) or as long as the model takes
    # (1,019 tokens each, with room for the steps), plus the steps' own tokens.
    per_sequence = min(1024, max_len - decode_calibration.STEPS - 2)
    assert m.decode_max_batch_size == 16
    assert 16 * (per_sequence + 1) <= m.decode_max_context_tokens <= 16 * (per_sequence + 3)
    assert costs.error[0] < 1.0
    block = block_layout(model, 16)
    _, _, span_s = max(costs.calibration, key=lambda sample: sample[1])
    drift = [1.0, time_steps(model, block, 16, per_sequence)[2] / span_s]
    checks = [(batch, context, [time_steps(model, block, batch, context)[2] for _ in range(2)])
              for batch, context in UNSEEN_BATCHES]
    drift.append(time_steps(model, block, 16, per_sequence)[2] / span_s)
    for batch, context, runs in checks:
        predicted = m.decode_step_s(batch, batch * context)
        assert within(predicted, runs, drift=tuple(drift)), (name, batch, context, predicted, runs, drift)


def test_decode_kv_bytes_per_token(model):
    assert decode_calibration.kv_bytes_per_token(model) == 2 * 8 * 2 * 64 * 4


def test_decode_calibration_times_the_determining_configurations_within_the_engine_limits(model):
    # Two sequences of at most 100 tokens (95 with room for the steps): one and two short ones, then one as long
    # as it may be (two of 100 give no more than short ones).
    samples = decode_calibration.calibrate(_engine(model, 2, 100))
    assert [b for b, _, _ in samples] == [1, 2, 1]
    assert [c // b in range(lo + 1, lo + 4) for (b, c, _), lo in zip(samples, (64, 64, 95))] == [True] * 3
    assert is_decode_determined(samples)
    # No budget: the three that determine the model, nothing more; the last over the whole arena (256 blocks of
    # 16 tokens).
    samples = decode_calibration.calibrate(_engine(model, 16, MAX_LEN), budget_s=0)
    assert [b for b, _, _ in samples] == [1, 16, 16]
    assert [c // b in range(lo + 1, lo + 4) for (b, c, _), lo in zip(samples, (64, 64, 256))] == [True] * 3
    assert is_decode_determined(samples)


def test_decode_refit_follows_slower_observations():
    truth = CostModel(decode_base_s=0.01, decode_per_seq_s=0.001, decode_per_context_token_s=1e-5)
    calibration = [(b, c, truth.decode_step_s(b, c)) for b, c in ((1, 64), (4, 256), (1, 512), (16, 1024),
                                                                  (16, 8192))]
    costs = DecodeCosts(calibration, kv_bytes_per_token=8192, window=256, refit_every=32)
    before = costs.model
    for i in range(64):
        b, c = 1 + i % 8, 100 * (1 + i % 8) + 7 * i
        costs.observe(b, c, 2 * truth.decode_step_s(b, c))
    assert costs.model is not before
    assert costs.model.decode_step_s(4, 1000) > 1.5 * before.decode_step_s(4, 1000)
    assert all(c >= 0 for c in coefficients(costs.model))


def test_decode_engine_records_its_steps(model):
    engine = _engine(model, 4)
    layers = [(torch.zeros(1, 2, 10, 64), torch.zeros(1, 2, 10, 64)) for _ in range(8)]
    seqs = [engine.sequence_with_kv(f"r{i}", SamplingParams(temperature=0.0, max_tokens=3), layers, 1)
            for i in range(2)]
    engine.step(seqs, set())
    assert engine.last_step[:2] == (2, 20) and engine.last_step[2] > 0
    assert engine.num_context_tokens == 22
    engine.step([], set())  # max_tokens reached: both leave
    assert engine.last_step[:2] == (2, 22)
    assert engine.num_context_tokens == 0
    engine.step([], set())
    assert engine.last_step is None


class FakeMsg:
    def __init__(self, data: bytes):
        self.data = data
        self.reply = None

    async def respond(self, data: bytes) -> None:
        self.reply = data


def task(n: int) -> PrefillTask:
    request = GenerateRequest(request_id=f"r{n}", model="demo", prompt_token_ids=list(range(n)),
                              sampling=SamplingParams(), arrival_time=time.time())
    return PrefillTask(request=request, decode_id="d", decode_segment="d")


async def test_prefill_heartbeat_carries_the_cost_model_and_queued_time(model):
    settings = Settings(instance_id="p-test")
    assert PrefillService(settings, PrefillEngine(model), MAX_LEN).heartbeat(False).cost_model is None
    costs = PrefillCosts([(16, 0, 0.02), (64, 0, 0.05), (256, 0, 0.2), (64, 256, 0.08)], 8192)
    service = PrefillService(settings, PrefillEngine(model), MAX_LEN, costs)
    beat = service.heartbeat(False)
    assert beat.cost_model == costs.model and beat.cost_model.source == "measured"
    assert beat.host == socket.gethostname()
    assert beat.status.queued_prefill_s == 0.0
    assert decode(encode(beat), Heartbeat).cost_model == costs.model
    for n in (30, 200):
        msg = FakeMsg(encode(task(n)))
        await service._on_task(msg)
        assert decode(msg.reply, TaskAck).is_accepted
    queued = costs.model.prefill_s(30) + costs.model.prefill_s(200)
    assert service.heartbeat(False).status.queued_prefill_s == pytest.approx(queued)
    # A prefill in progress adds what remains of its prediction: all of it before its first chunk, then the share
    # of its tokens still to compute.
    service.pipeline.expect("r", 100, 0)
    assert service.heartbeat(False).status.queued_prefill_s == pytest.approx(queued + costs.model.prefill_s(100))
    job = PrefillEngine(model, chunk_tokens=25).start(list(range(100)))
    job.step()
    service._active["r"] = (service._active["r"][0], job)
    assert service.heartbeat(False).status.queued_prefill_s == pytest.approx(queued + 0.75 * costs.model.prefill_s(100))
    assert service.heartbeat(False).status.num_running == 1
    service._active.clear()
    # Taking a task off the queue (shutdown here) drops it from the prediction.
    service.nc = FakeBus()
    await service._fail_queued("stopping")
    assert service.heartbeat(False).status.queued_prefill_s == 0.0


async def test_prefill_records_real_runs(model):
    costs = PrefillCosts([(16, 0, 0.02), (64, 0, 0.05), (256, 0, 0.2)], 8192, refit_every=1)
    service = PrefillService(Settings(instance_id="p-test", cluster_secret="x"), PrefillEngine(model), MAX_LEN,
                             costs)
    service.nc = FakeBus()
    t = task(40)
    t.request.sampling.max_tokens = 1  # finishes at prefill: no hand-over to a decode worker
    await service.pipeline.run(t)
    assert [(n, r) for n, r, _ in costs.recent] == [(40, 0)]
    assert costs.recent[0][2] > 0


class FakeBus:
    def __init__(self):
        self.published = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append((subject, data))


async def test_decode_heartbeat_carries_the_cost_model_and_context(model):
    costs = DecodeCosts([(1, 64, 0.01), (4, 256, 0.02), (16, 1024, 0.05)], 8192, refit_every=1)
    engine = _engine(model, 4, MAX_LEN)
    service = DecodeService(Settings(instance_id="d-test"), engine, costs)
    service.nc = FakeBus()
    beat = service.heartbeat(False)
    assert beat.cost_model == costs.model and beat.host == socket.gethostname() and beat.status.num_context_tokens == 0
    assert beat.status.num_free_kv_bytes == 256 * engine.kv.block_bytes
    service._arrived = [engine.sequence_with_kv(
        f"r{i}", SamplingParams(temperature=0.0, max_tokens=100),
        [(torch.zeros(1, 2, 10 + i, 64), torch.zeros(1, 2, 10 + i, 64)) for _ in range(8)], 1) for i in range(3)]
    await service._step()
    beat = service.heartbeat(False)
    assert beat.status.num_context_tokens == 11 + 12 + 13
    # One 16-token block each.
    assert beat.status.num_free_kv_bytes == 253 * engine.kv.block_bytes
    assert [(b, c) for b, c, _ in costs.recent] == [(3, 33)]
    assert service.heartbeat(False).cost_model is costs.model
    assert DecodeService(Settings(instance_id="d-test"), _engine(model, 4, MAX_LEN)).heartbeat(
        False).cost_model is None

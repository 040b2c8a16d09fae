"""Workers' cost models: start-up calibration predicts shapes it did not time, online refits follow the machine,
and the heartbeats publish the model, the host and the predicted load."""

import random
import socket
import statistics
import time

import pytest
import torch

from tsukimi.common.cost_model import CostModel
from tsukimi.common.messages import (
    GenerateRequest, Heartbeat, PrefillTask, SamplingParams, TaskAck, decode, encode,
)
from tsukimi.common.settings import Settings
from tsukimi.decode import calibration as decode_calibration
from tsukimi.decode.calibration import DecodeCosts
from tsukimi.decode.engine import DecodeEngine
from tsukimi.decode.kv_blocks import KVBlocks
from tsukimi.model.kv import block_layout
from tsukimi.decode.service import DecodeService
from tsukimi.model.loader import build_demo_model
from tsukimi.prefill import calibration as prefill_calibration
from tsukimi.prefill.calibration import PrefillCosts
from tsukimi.prefill.engine import PrefillEngine
from tsukimi.prefill.service import PrefillService

MAX_LEN = 4096


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
def prefill_costs(model):
    engine = PrefillEngine(model)
    started = time.perf_counter()
    costs = prefill_calibration.measure(engine, MAX_LEN)
    return costs, time.perf_counter() - started


@pytest.fixture(scope="module")
def decode_costs(model):
    started = time.perf_counter()
    costs = decode_calibration.measure(_engine(model, 16, MAX_LEN))
    return costs, time.perf_counter() - started


def _engine(model, max_batch_size: int, max_len: int = MAX_LEN) -> DecodeEngine:
    return DecodeEngine(model, max_batch_size, max_len, KVBlocks(block_layout(model, 16), 256))


def coefficients(m: CostModel) -> list[float]:
    return [m.prefill_base_s, m.prefill_per_token_s, m.prefill_per_pair_s, m.decode_base_s, m.decode_per_seq_s,
            m.decode_per_context_token_s]


def within(predicted: float, measured: float, factor: float = 2.0) -> bool:
    return measured / factor <= predicted <= measured * factor


def test_prefill_calibration_predicts_an_unseen_shape(model, prefill_costs):
    costs, seconds = prefill_costs
    m = costs.model
    assert m.source == "measured"
    assert all(c >= 0 for c in coefficients(m))
    assert m.prefill_per_token_s > 0
    assert m.kv_bytes_per_token == PrefillEngine(model).block_layout(1).num_bytes == 2 * 8 * 2 * 64 * 4
    assert seconds < 2 * prefill_calibration.BUDGET_S
    engine = PrefillEngine(model)
    rng = random.Random(1)
    prompt = [rng.randrange(257) for _ in range(384)]
    prefix = [(k[:, :, :160].contiguous(), v[:, :, :160].contiguous()) for k, v in engine.run(prompt[:161]).kv]
    # NOTE: shapes long enough for the machine's noise (another process on the other core) to stay small; the
    # fit itself is checked exactly on synthetic samples elsewhere.
    for new, reused in ((384, 0), (96, 160)):
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            engine.run(prompt[:reused + new], prefix if reused else None)
            runs.append(time.perf_counter() - started)
        measured = statistics.median(runs)
        assert within(m.prefill_s(new, reused), measured, factor=3.0), (new, reused, m.prefill_s(new, reused),
                                                                         measured)


def test_prefill_calibration_keeps_to_its_budget_and_the_context(model):
    engine = PrefillEngine(model)
    # No budget: only the first shape is timed.
    assert [(n, r) for n, r, _ in prefill_calibration.calibrate(engine, MAX_LEN, budget_s=0)] == [(16, 0)]
    # A short context caps every shape (and merges the ones that become equal).
    samples = prefill_calibration.calibrate(engine, 41)
    assert sorted((n, r) for n, r, _ in samples) == [(16, 0), (16, 24), (40, 0)]
    assert all(t > 0 for _, _, t in samples)


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


def test_decode_calibration_predicts_an_unseen_batch(model, decode_costs, monkeypatch):
    costs, seconds = decode_costs
    m = costs.model
    assert m.source == "measured"
    assert all(c >= 0 for c in coefficients(m))
    assert m.decode_base_s + m.decode_per_seq_s > 0
    assert m.kv_bytes_per_token == 2 * 8 * 2 * 64 * 4
    assert seconds < 2 * decode_calibration.BUDGET_S
    monkeypatch.setattr(decode_calibration, "CONFIGS", ((8, 256), (2, 128)))
    for batch, context, measured in decode_calibration.calibrate(_engine(model, 16, MAX_LEN)):
        assert within(m.decode_step_s(batch, context), measured, factor=3.0), (batch, context, measured)


def test_decode_calibration_respects_the_engine_limits(model):
    samples = decode_calibration.calibrate(_engine(model, 2, 100))
    assert {b for b, _, _ in samples} == {1, 2}
    # Contexts capped below max_model_len (with room for the timed steps), measured after the untimed step.
    assert all(c <= b * 100 for b, c, _ in samples)
    # No budget: only the first configuration; its median step holds 64 + 1..3 tokens.
    [(batch, context, _)] = decode_calibration.calibrate(_engine(model, 16, MAX_LEN), budget_s=0)
    assert batch == 1 and 65 <= context <= 67


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
    assert beat.queued_prefill_s == 0.0
    assert decode(encode(beat), Heartbeat).cost_model == costs.model
    for n in (30, 200):
        msg = FakeMsg(encode(task(n)))
        await service._on_task(msg)
        assert decode(msg.reply, TaskAck).is_accepted
    queued = costs.model.prefill_s(30) + costs.model.prefill_s(200)
    assert service.heartbeat(False).queued_prefill_s == pytest.approx(queued)
    # A prefill in progress adds what remains of its prediction: all of it before its first chunk, then the share
    # of its tokens still to compute.
    service._expect("r", 100, 0)
    assert service.heartbeat(False).queued_prefill_s == pytest.approx(queued + costs.model.prefill_s(100))
    job = PrefillEngine(model, chunk_tokens=25).start(list(range(100)))
    job.step()
    service._active["r"] = (service._active["r"][0], job)
    assert service.heartbeat(False).queued_prefill_s == pytest.approx(queued + 0.75 * costs.model.prefill_s(100))
    assert service.heartbeat(False).num_running == 1
    service._active.clear()
    # Taking a task off the queue (shutdown here) drops it from the prediction.
    service.nc = FakeBus()
    await service._fail_queued("stopping")
    assert service.heartbeat(False).queued_prefill_s == 0.0


async def test_prefill_records_real_runs(model):
    costs = PrefillCosts([(16, 0, 0.02), (64, 0, 0.05), (256, 0, 0.2)], 8192, refit_every=1)
    service = PrefillService(Settings(instance_id="p-test", cluster_secret="x"), PrefillEngine(model), MAX_LEN,
                             costs)
    service.nc = FakeBus()
    t = task(40)
    t.request.sampling.max_tokens = 1  # finishes at prefill: no hand-over to a decode worker
    await service._process(t)
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
    assert beat.cost_model == costs.model and beat.host == socket.gethostname() and beat.num_context_tokens == 0
    assert beat.num_free_kv_bytes == 256 * engine.kv.block_bytes
    service._arrived = [engine.sequence_with_kv(
        f"r{i}", SamplingParams(temperature=0.0, max_tokens=100),
        [(torch.zeros(1, 2, 10 + i, 64), torch.zeros(1, 2, 10 + i, 64)) for _ in range(8)], 1) for i in range(3)]
    await service._step()
    beat = service.heartbeat(False)
    assert beat.num_context_tokens == 11 + 12 + 13
    # One 16-token block each.
    assert beat.num_free_kv_bytes == 253 * engine.kv.block_bytes
    assert [(b, c) for b, c, _ in costs.recent] == [(3, 33)]
    assert service.heartbeat(False).cost_model is costs.model
    assert DecodeService(Settings(instance_id="d-test"), _engine(model, 4, MAX_LEN)).heartbeat(
        False).cost_model is None

"""The conductor's decisions on its view, without a broker: early rejection answers 429 with Retry-After before
any prefill is asked; a request for a model nobody serves is a 503."""

import time

from tsukimi.common.cost_model import CostModel
from tsukimi.common.messages import DecodeStatus, GenerateRequest, Heartbeat, PrefillStatus, SamplingParams
from tsukimi.common.settings import Settings
from tsukimi.conductor import refusals
from tsukimi.conductor.service import ConductorService
from tsukimi.gateway.errors import APIError

COST = CostModel(prefill_per_token_s=0.001, decode_base_s=0.01, decode_per_seq_s=0.001, source="measured")


class NoJournal:
    def record(self, *args):
        pass


def service(**settings) -> ConductorService:
    svc = ConductorService(Settings(nats_url="nats://127.0.0.1:1", **settings), NoJournal())
    for kind in ("prefill", "decode"):
        status = PrefillStatus(max_running=8, queued_prefill_s=40.0) if kind == "prefill" else DecodeStatus(
            max_running=8)
        beat = Heartbeat(instance_id=f"{kind}-0", status=status, model="demo", cost_model=COST,
                         kv_segment=f"{kind}-0")
        svc.registry.observe(beat, time.monotonic())
        svc.view.observe(beat, time.monotonic())
    return svc


def request(model="demo") -> GenerateRequest:
    return GenerateRequest(request_id="r1", model=model, prompt_token_ids=list(range(100)),
                           sampling=SamplingParams(max_tokens=16), arrival_time=0.0)


async def test_a_request_that_would_miss_its_ttft_slo_is_rejected_with_429_and_retry_after():
    svc = service(ttft_slo_s=30.0, rejection="early")
    reply = await svc._place(request())  # prefill-0 has 40 s of work queued: nothing is dispatched
    assert not reply.is_accepted and reply.error.http_status == 429 and reply.error.code == "overloaded"
    assert "time to first token" in reply.error.message
    error = APIError.from_info(reply.error)
    assert error.status == 429 and int(error.headers["Retry-After"]) >= 10
    assert error.envelope()["error"]["type"] == "rate_limit_error"


async def test_retry_after_comes_from_the_bounded_ttft():
    svc = service(ttft_slo_s=30.0, rejection="early")
    # prefill-0's model measured up to 1000 tokens, its pair term steep: 1 ms per token + 10 us per pair.
    ranged = CostModel(prefill_per_token_s=0.001, prefill_per_pair_s=1e-5, prefill_max_tokens=1000,
                       decode_base_s=0.01, source="measured")
    beat = Heartbeat(instance_id="prefill-0", status=PrefillStatus(max_running=8, queued_prefill_s=0.0),
                     model="demo", cost_model=ranged, kv_segment="prefill-0")
    svc.view.observe(beat, time.monotonic())
    long = GenerateRequest(request_id="r2", model="demo", prompt_token_ids=list(range(6000)),
                           sampling=SamplingParams(max_tokens=16), arrival_time=0.0)
    _, decision = svc.decide(long, time.monotonic())
    # The quadratic says 6 + 180 s; refused on 6 x the 6 s edge = 36 s: Retry-After 6 s, not 156.
    assert decision.rejected == "ttft_slo" and decision.predicted_ttft_s > 180
    info = refusals.refusal(long, decision, 30.0, svc.settings.tbt_slo_s, True, [], None)
    error = APIError.from_info(info)
    assert error.status == 429 and int(error.headers["Retry-After"]) == 6
    assert "36.0s" in info.message


async def test_unknown_model_is_503_no_capacity():
    svc = service(rejection="none")
    reply = await svc._place(request(model="other"))
    assert reply.error.http_status == 503 and reply.error.code == "no_capacity"
    assert "prefill" in reply.error.message

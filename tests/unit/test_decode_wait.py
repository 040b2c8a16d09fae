"""The conductor's queue of requests waiting for decode room, the wait it derives from the gateway's timeout, and
the errors it answers. Pure, exact expectations."""

from tsukimi.common.cost_model import CostModel
from tsukimi.common.messages import GenerateRequest, SamplingParams
from tsukimi.conductor import refusals
from tsukimi.conductor.cluster import DecodeEntry, DecodeInstance
from tsukimi.conductor.decode_wait import DecodeWaitQueue, wait_budget_s
from tsukimi.conductor.placement import Decision
from tsukimi.gateway.errors import APIError


def test_the_wait_ends_before_the_gateway_gives_up():
    assert wait_budget_s(5.0, 10.0, 3.0) == 5.0
    assert wait_budget_s(8.0, 10.0, 3.0) == 6.5  # 10 s - one 3 s dispatch - 0.5 s margin
    assert wait_budget_s(5.0, 1.0, 3.0) == 0.0   # no time to wait at all
    assert wait_budget_s(0.0, 10.0, 3.0) == 0.0


def test_queue_is_bounded_ordered_and_expires():
    q: DecodeWaitQueue[str] = DecodeWaitQueue(max_requests=2, wait_s=5.0)
    assert q.next_deadline() is None
    assert q.push("a", "A", now=1.0) and not q.push("a", "A again", now=1.5)
    assert q.push("b", "B", now=2.0)
    assert not q.push("c", "C", now=2.0)  # full
    assert len(q) == 2 and "a" in q and "c" not in q
    assert [(k, w.item, w.since, w.deadline) for k, w in q.waiting()] == [("a", "A", 1.0, 6.0), ("b", "B", 2.0, 7.0)]
    assert q.next_deadline() == 6.0
    assert q.expire(5.9) == []
    assert [(k, w.item) for k, w in q.expire(6.0)] == [("a", "A")]
    assert q.remove("a") is None and q.remove("b").item == "B" and len(q) == 0
    assert q.push("c", "C", now=7.0) and q.push("d", "D", now=7.0)
    assert [k for k, _ in q.drain()] == ["c", "d"] and len(q) == 0


def test_no_wait_queues_nothing():
    q: DecodeWaitQueue[str] = DecodeWaitQueue(max_requests=10, wait_s=0.0)
    assert not q.push("a", "A", now=0.0) and len(q) == 0
    assert not DecodeWaitQueue(max_requests=0, wait_s=5.0).push("a", "A", now=0.0)


COST = CostModel(decode_base_s=0.01, kv_bytes_per_token=100)
REQUEST = GenerateRequest(request_id="r", model="demo", prompt_token_ids=list(range(3000)),
                          sampling=SamplingParams(max_tokens=200), arrival_time=0.0)


def test_a_request_larger_than_every_arena_is_a_400_naming_its_size():
    decodes = [DecodeInstance("d0", COST, 8, 2048), DecodeInstance("d1", COST, 8, 1024)]
    error = refusals.refusal(REQUEST, Decision(rejected="kv_too_large"), 30.0, 1.0, True, decodes, 0)
    assert (error.http_status, error.type, error.code) == (400, "invalid_request_error", "kv_capacity_exceeded")
    assert error.message == ("the request needs KV cache for 3200 tokens (prompt 3000 + max_tokens 200), more than "
                             "any decode instance holds (2048 tokens); shorten the prompt or lower max_tokens")
    assert APIError.from_info(error).status == 400 and error.retry_after_s == 0


def test_a_full_queue_and_an_expired_wait_are_429s_with_retry_after():
    full = refusals.refusal(REQUEST, Decision(rejected="decode_full", predicted_ttft_s=2.0), 30.0, 1.0, True, [], 128)
    assert (full.http_status, full.code, full.retry_after_s) == (429, "overloaded", 1.0)
    assert full.message == ("the server is overloaded: no decode instance has room for its KV, and 128 requests "
                            "already wait for room; retry later")
    d = DecodeInstance("d0", COST, 8, 2048)
    d.add("x", DecodeEntry(100, 0.0, 14.0))
    d.add("y", DecodeEntry(100, 0.0, 17.0))
    over = refusals.wait_over(5.0, [d], now=10.0)
    assert (over.http_status, over.code, over.retry_after_s) == (429, "overloaded", 4.0)
    assert over.message == "the server is overloaded: no decode instance had room for its KV within 5s; retry later"
    error = APIError.from_info(over)
    assert error.status == 429 and error.headers["Retry-After"] == "4"
    assert refusals.wait_over(5.0, [], now=10.0).retry_after_s == 1.0

"""`tsukimi bench serve`: prompt blocks from hash ids, scaling and schedules, SSE parsing, TBT / percentiles /
effective capacity on hand-made timings, the sweep's search, and the whole client against a tiny fake server."""

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pytest

from tsukimi.bench.serve_client import run_schedule
from tsukimi.bench.serve_metrics import distribution, per_request, summarize, tpot_of
from tsukimi.bench.serve_record import (
    CLIENT_OVERLOAD,
    FAILED,
    OK,
    REJECTED,
    RequestRecord,
    SseDecoder,
    SseLineSplitter,
    apply_event,
)
from tsukimi.bench.serve_sweep import RateSearch
from tsukimi.bench.serve_workload import (
    PlannedRequest,
    PromptMaker,
    scale_length,
    synthetic_schedule,
    trace_blocks,
    trace_schedule,
)
from tsukimi.cli import main


def row(ms, tokens, output, keys):
    return {"timestamp": ms, "input_length": tokens, "output_length": output, "hash_ids": list(keys)}


# ---- prompts from hash ids -----------------------------------------------------------------------------------


def test_equal_hash_ids_give_equal_blocks_and_different_ids_differ():
    a, b = PromptMaker(salt=7), PromptMaker(salt=7)
    assert np.array_equal(a.block(42, 10), b.block(42, 10))
    assert not np.array_equal(a.block(42, 10), a.block(43, 10))
    # A shorter block of the same id is a prefix of a longer one, whichever is drawn first.
    assert np.array_equal(a.block(5, 30)[:10], b.block(5, 10))
    assert np.array_equal(b.block(5, 30)[:10], a.block(5, 10))
    # Another salt: other blocks.
    assert not np.array_equal(PromptMaker(salt=8).block(42, 10), a.block(42, 10))


def test_token_ids_stay_in_the_vocabulary_and_avoid_eos():
    ids = np.concatenate([PromptMaker().block(h, 500) for h in range(20)])
    assert ids.min() >= 0 and ids.max() <= 255 and 256 not in ids
    assert len(set(ids.tolist())) == 256  # every byte shows up
    ids = np.concatenate([PromptMaker(vocab_size=300, avoid_ids=(256, 0)).block(h, 500) for h in range(20)])
    assert ids.max() <= 299 and 256 not in ids and 0 not in ids and ids.max() > 256


def test_shared_leading_hash_ids_give_a_shared_prefix():
    maker = PromptMaker(salt=1)
    p1 = maker.prompt(trace_blocks([1, 2, 3], 10, 30))
    p2 = maker.prompt(trace_blocks([1, 2, 4], 10, 25))
    assert len(p1) == 30 and len(p2) == 25
    assert p1[:20] == p2[:20] and p1[20:25] != p2[20:25]
    assert all(type(t) is int for t in p1)


def test_trace_blocks_cover_the_scaled_length():
    assert trace_blocks([1, 2, 3], 10, 30) == [(1, 10), (2, 10), (3, 10)]
    # The last id takes what is left, more or less than a block.
    assert trace_blocks([1, 2, 3], 10, 27) == [(1, 10), (2, 10), (3, 7)]
    assert trace_blocks([1, 2, 3], 10, 33) == [(1, 10), (2, 10), (3, 13)]
    assert trace_blocks([1, 2, 3], 10, 12) == [(1, 10), (2, 2)]


# ---- scaling and schedules -----------------------------------------------------------------------------------


def test_length_scaling_rounds_and_keeps_one_token():
    assert scale_length(15325, 0.02) == 307  # 306.5 rounds half up
    assert scale_length(512, 0.02) == 10
    assert scale_length(6, 0.02) == 1 and scale_length(1, 0.001) == 1
    assert scale_length(149, 0.02) == 3


def test_trace_schedule_scales_times_and_lengths():
    trace = [row(2000, 1024, 100, [1, 2]), row(0, 512, 49, [1]), row(3000, 600, 10, [3, 4])]
    s = trace_schedule(trace, PromptMaker(salt=3), rate_scale=2.0, length_scale=0.02)
    assert [r.arrival_s for r in s.requests] == [0.0, 1.0, 1.5]  # sorted, divided by the rate scale
    assert [len(r.prompt) for r in s.requests] == [10, 20, 12]
    assert [r.max_tokens for r in s.requests] == [1, 2, 1]
    assert [r.index for r in s.requests] == [0, 1, 2]
    assert s.requests[0].prompt == s.requests[1].prompt[:10]  # hash id 1 leads both
    # 3 arrivals over 1.5 s: 2 gaps of 0.75 s on average, so the window runs one more gap and the rate is 4/3.
    assert s.window_s == 2.25 and s.offered_rate == pytest.approx(4 / 3)
    # Outputs may scale on their own.
    s = trace_schedule(trace, PromptMaker(salt=3), length_scale=0.02, output_scale=0.1)
    assert [len(r.prompt) for r in s.requests] == [10, 20, 12]
    assert [r.max_tokens for r in s.requests] == [5, 10, 1]


def test_trace_schedule_limit_and_duration_in_replay_time():
    trace = [row(t * 1000, 512, 50, [t]) for t in range(10)]
    s = trace_schedule(trace, PromptMaker(), rate_scale=2.0, length_scale=0.02, duration_s=2.0)
    assert [r.arrival_s for r in s.requests] == [0.0, 0.5, 1.0, 1.5]
    assert s.window_s == 2.0 and s.offered_rate == 2.0
    s = trace_schedule(trace, PromptMaker(), length_scale=0.02, limit=3)
    assert [r.arrival_s for r in s.requests] == [0.0, 1.0, 2.0]


def test_synthetic_schedule_poisson_lengths_and_shared_prefix():
    maker = PromptMaker(salt=0)
    s = synthetic_schedule(maker, rate=5.0, input_len=100, output_len=8, prefix_ratio=0.5, duration_s=200.0, seed=1)
    gaps = np.diff([r.arrival_s for r in s.requests])
    assert s.requests[0].arrival_s == 0.0 and all(r.arrival_s < 200.0 for r in s.requests)
    assert abs(len(s.requests) / 200.0 - 5.0) < 0.5 and abs(gaps.mean() - 0.2) < 0.02
    assert all(len(r.prompt) == 100 and r.max_tokens == 8 for r in s.requests)
    first, second = s.requests[0].prompt, s.requests[1].prompt
    assert first[:50] == second[:50] and first[50:] != second[50:]
    again = synthetic_schedule(PromptMaker(salt=0), rate=5.0, input_len=100, output_len=8, prefix_ratio=0.5,
                               duration_s=200.0, seed=1)
    assert [r.arrival_s for r in again.requests] == [r.arrival_s for r in s.requests]
    ranged = synthetic_schedule(maker, rate=5.0, input_len=100, output_len=10, range_ratio=0.5, limit=200, seed=2)
    lengths = [len(r.prompt) for r in ranged.requests]
    assert len(ranged.requests) == 200 and min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 20
    assert all(5 <= r.max_tokens <= 15 for r in ranged.requests)


# ---- SSE parsing ---------------------------------------------------------------------------------------------

RECORDED = (
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"demo","choices":[{"index":0,'
    '"text":"ab","logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    ': keep-alive comment\n\n'
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"demo","choices":[{"index":0,'
    '"text":"c","logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"demo","choices":[{"index":0,'
    '"text":"","logprobs":null,"finish_reason":"length"}],"usage":null}\n\n'
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"demo","choices":[],"usage":'
    '{"prompt_tokens":300,"completion_tokens":4,"total_tokens":304,"prompt_tokens_details":{"cached_tokens":192}}}'
    '\n\n'
    "data: [DONE]\n\n"
)


def feed(rec, text, times):
    decoder = SseDecoder()
    clock = iter(times)
    for line in text.split("\n"):
        data = decoder.feed(line)
        if data is not None and apply_event(rec, data, next(clock)):
            return True
    return False


def test_sse_parsing_of_a_recorded_stream():
    rec = RequestRecord(0, 0.0, 4)
    assert feed(rec, RECORDED, [0.5, 0.6, 0.7, 0.71, 0.72])
    assert rec.token_times == [0.5, 0.6]  # chunks with text; the finish chunk is not a token
    assert rec.finish_reason == "length" and rec.finish_s == 0.7
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens) == (300, 4, 192)
    assert rec.is_done_seen and rec.outcome != FAILED and rec.num_output_tokens == 4


def test_sse_multiline_data_chat_deltas_and_error_events():
    decoder = SseDecoder()
    assert decoder.feed("data: {\"a\":") is None and decoder.feed("data: 1}") is None
    assert decoder.feed("") == '{"a":\n1}'
    rec = RequestRecord(0, 0.0, 4)
    apply_event(rec, json.dumps({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), 0.1)
    apply_event(rec, json.dumps({"choices": [{"delta": {"content": "x"}}]}), 0.2)
    assert rec.token_times == [0.2]
    apply_event(rec, json.dumps({"error": {"message": "worker lost", "type": "x"}}), 0.3)
    assert rec.outcome == FAILED and rec.error == "stream_error" and rec.message == "worker lost"


def split(chunks: list[bytes]) -> list[str]:
    splitter = SseLineSplitter()
    return [line for chunk in chunks for line in splitter.feed(chunk)] + splitter.flush()


def test_sse_lines_end_only_at_cr_lf_and_crlf():
    data = '{"text":"a\u2028b\u0085c\u001cd\u2029e\x0bf\x0cg"}'
    stream = f"data: {data}\n\ndata: 2\r\n\r\ndata: 3\r\rdata: 4".encode()
    assert split([stream]) == [f"data: {data}", "", "data: 2", "", "data: 3", "", "data: 4"]
    # Any chunking gives the same lines: a CRLF split between chunks is one line end.
    assert split([stream[i:i + 1] for i in range(len(stream))]) == split([stream])
    assert split([b"data: 1\r", b"\ndata: 2\r", b"\r", b"\n"]) == ["data: 1", "data: 2", ""]
    assert split([b"a\r", b"", b"\nb\n"]) == ["a", "b"]
    # The spec's leading BOM is dropped (only at the start of the stream).
    assert split([b"\xef\xbb", b"\xbfdata: x\n\xef\xbb\xbf\n"]) == ["data: x", "\ufeff"]
    # An event as the gateway writes it (json.dumps with ensure_ascii=False leaves U+2028 and U+0085 raw).
    event = json.dumps({"choices": [{"text": "a\u2028b\u0085c\u001c", "finish_reason": None}]}, ensure_ascii=False)
    assert "\u2028" in event and "\u0085" in event
    decoder = SseDecoder()
    data = [decoder.feed(line) for line in split([f"data: {event}\r\n\r\n".encode()])]
    rec = RequestRecord(0, 0.0, 4)
    assert data == [None, event] and apply_event(rec, data[1], 0.1) is False
    assert rec.outcome != FAILED and rec.token_times == [0.1]


def test_sse_lines_decode_characters_split_across_chunks():
    stream = "data: é😀\n".encode()
    cut = stream.index("😀".encode()) + 1
    assert split([stream[:8], stream[8:cut], stream[cut:]]) == ["data: é😀"]
    assert split([b"data: \xff\n"]) == ["data: \ufffd"]


# ---- metrics on hand-made timings ----------------------------------------------------------------------------


def done(index, arrival, times, completion=None, prompt=None, cached=None, max_tokens=None):
    rec = RequestRecord(index, arrival, max_tokens or len(times))
    rec.sent_s, rec.status, rec.outcome = arrival, 200, OK
    rec.token_times = list(times)
    rec.finish_s = rec.done_s = times[-1]
    rec.finish_reason = "length"
    rec.completion_tokens, rec.prompt_tokens, rec.cached_tokens = completion, prompt, cached
    return rec


def test_tbt_ttft_tpot_and_effective_capacity():
    # 21 tokens: 20 gaps of 0.05 s but two of 0.5 s -> TBT = mean of the longest 2 = 0.5.
    gaps = [0.05] * 18 + [0.5, 0.5]
    times = list(np.cumsum([1.0] + gaps))
    slow_tbt = done(0, 0.0, times, completion=21, prompt=100, cached=64)
    fast = done(1, 1.0, [1.5, 1.6, 1.7], completion=3, prompt=100, cached=0)
    late = done(2, 2.0, [5.0, 5.1], completion=2, prompt=50, cached=50)
    one = done(3, 3.0, [3.25], completion=1, prompt=50, cached=0, max_tokens=4)  # stopped early
    rejected = RequestRecord(4, 4.0, 4, sent_s=4.0, status=429, outcome=REJECTED, retry_after="1")
    failed = RequestRecord(5, 5.0, 4, outcome=FAILED, error=CLIENT_OVERLOAD, message="256 outstanding")
    records = [slow_tbt, fast, late, one, rejected, failed]
    ttft, tbt = per_request(records)
    assert ttft[:4].tolist() == pytest.approx([1.0, 0.5, 3.0, 0.25]) and math.isinf(ttft[4]) and math.isinf(ttft[5])
    assert tbt[:4].tolist() == pytest.approx([0.5, 0.1, 0.1, 0.0])
    assert tpot_of(slow_tbt) == pytest.approx((times[-1] - 1.0) / 20) and tpot_of(one) is None
    s = summarize(records, elapsed_s=10.0, window_s=6.0, ttft_slo_s=2.0, tbt_slo_s=0.2)
    # Both SLOs: fast and one (2 of 6 scheduled; rejected and failed count as missing).
    assert s["meeting_slo"] == 2 and s["effective_capacity"] == pytest.approx(2 / 6, abs=1e-4)
    assert s["goodput_rps"] == pytest.approx(2 / 6, abs=1e-4) and s["offered_rate_rps"] == 1.0
    assert s["completed"] == 4 and s["rejected"] == 1 and s["failed"] == 1
    assert s["rejection_rate"] == pytest.approx(1 / 6, abs=1e-4) and s["failed_by_kind"] == {CLIENT_OVERLOAD: 1}
    assert s["retry_after"] == {"1": 1} and s["num_sent"] == 5
    assert s["failure_examples"] == {CLIENT_OVERLOAD: "256 outstanding"}
    assert s["prefix_hit_rate"] == pytest.approx(114 / 300, abs=1e-4)
    assert s["output_tokens"] == 27 and s["short_answers"] == 1 and s["request_throughput_rps"] == 0.4
    assert s["ttft_s"]["p50"] == pytest.approx(0.75)
    assert s["ttft_slo_attainment"] == pytest.approx(3 / 6, abs=1e-4)


def test_distribution_percentiles():
    d = distribution(list(range(1, 101)) + [math.inf])
    assert d == {"mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01}
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


# ---- the sweep's search --------------------------------------------------------------------------------------


def search_with(capacity_at, **kw):
    search = RateSearch(0.9, **kw)
    while (load := search.next()) is not None:
        search.record(load, capacity_at(load))
    return search


def test_geometric_search_brackets_then_bisects():
    search = search_with(lambda x: 1.0 if x <= 3.3 else 0.5, start=1.0, factor=2.0, precision=1.2, max_points=10)
    loads = [p[0] for p in search.points]
    assert loads[:3] == [1.0, 2.0, 4.0]
    assert loads[3] == pytest.approx(math.sqrt(8)) and loads[4] == pytest.approx(math.sqrt(math.sqrt(8) * 4))
    assert len(loads) == 5 and search.best == pytest.approx(math.sqrt(8))


def test_search_downwards_and_limits():
    search = search_with(lambda x: 0.95 if x <= 0.3 else 0.0, start=1.0, precision=1.5, max_points=10)
    assert [p[0] for p in search.points][:3] == [1.0, 0.5, 0.25]
    assert 0.25 <= search.best <= 0.3
    assert search_with(lambda x: 1.0, start=1.0, max_points=3).best == 4.0
    assert search_with(lambda x: 0.0, start=1.0, max_points=4).best is None


def test_given_rates_are_all_measured():
    search = search_with(lambda x: 1.0 if x < 2 else 0.0, rates=[4.0, 0.5, 1.0, 2.0])
    assert [p[0] for p in search.points] == [0.5, 1.0, 2.0, 4.0] and search.best == 1.0


# ---- the whole client against a fake server ------------------------------------------------------------------

FIRST_TOKEN_S = 0.15
TOKEN_GAP_S = 0.02


def fake_app():
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()
    card = {"id": "fake-model", "object": "model", "vocab_size": 300, "special_token_ids": [0, 256]}
    state = {"n": 0, "bodies": [], "card": card}
    app.state.fake = state

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [state["card"]]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.setdefault("chats", []).append(body)
        n = len(body["messages"])
        answer = {"role": "assistant", "content": f"answer\u2028{n}"}
        usage = {"prompt_tokens": 10 * n, "completion_tokens": 2,
                 "prompt_tokens_details": {"cached_tokens": 10 * (n - 2)}}
        return {"choices": [{"index": 0, "message": answer, "finish_reason": "stop"}], "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state["n"] += 1
        state["bodies"].append(body)
        if state["n"] % 4 == 0:
            return JSONResponse({"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                                           "code": "rate_limit_exceeded"}}, 429, headers={"Retry-After": "2"})

        async def events():
            await asyncio.sleep(FIRST_TOKEN_S)
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(TOKEN_GAP_S)
                # NOTE: U+2028 unescaped, as the gateway sends it: not a line end of the stream.
                chunk = {"choices": [{"index": 0, "text": "x\u2028", "finish_reason": None}], "usage": None}
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\r\n\r\n"
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"],
                     "prompt_tokens_details": {"cached_tokens": 8}}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def fake_server():
    import uvicorn

    app = fake_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", app.state.fake
    server.should_exit = True
    thread.join(5)
    sock.close()


def test_whole_client_against_a_fake_server(fake_server, capsys, tmp_path):
    url, state = fake_server
    code = main(["bench", "serve", "--url", url, "--synthetic", "--rate", "40", "--limit", "12", "--input-len",
                 "20", "--output-len", "4", "--prefix-ratio", "0.5", "--ttft-slo", "1.0", "--tbt-slo", "0.5",
                 "--json", "--records", str(tmp_path / "records.jsonl")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["model"] == "fake-model" and state["n"] == 12
    body = state["bodies"][0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["max_tokens"] == 4 and len(body["prompt"]) == 20
    # The ids the card lists, but its special ones.
    assert out["config"]["vocab_size"] == 300 and out["config"]["avoid_ids"] == [0, 256]
    ids = {t for b in state["bodies"] for t in b["prompt"]}
    assert max(ids) < 300 and max(ids) > 256 and not ids & {0, 256}
    assert out["num_scheduled"] == 12 and out["rejected"] == 3 and out["completed"] == 9 and out["failed"] == 0
    assert out["rejection_rate"] == 0.25 and out["retry_after"] == {"2": 3}
    assert out["rejected_by_message"] == {"busy": 3}
    assert out["effective_capacity"] == 0.75 and out["meeting_slo"] == 9
    assert FIRST_TOKEN_S <= out["ttft_s"]["p50"] < FIRST_TOKEN_S + 0.5
    assert TOKEN_GAP_S * 0.9 <= out["itl_s"]["p50"] < TOKEN_GAP_S + 0.2
    assert out["output_tokens"] == 36 and out["prefix_hit_rate"] == pytest.approx(8 / 20)
    assert out["tokens_per_chunk"] == 1.0 and out["short_answers"] == 0
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == 12 and {r["rate"] for r in records} == {40}
    assert [r["outcome"] for r in records].count("rejected") == 3
    assert all(r["prompt_len"] == 20 for r in records)
    assert all(len(r["token_times"]) == 4 for r in records if r["outcome"] == "ok")


async def test_client_overload_and_unfinished(fake_server):
    url, _ = fake_server
    plans = [PlannedRequest(i, 0.0, [1, 2, 3], 2) for i in range(3)]
    out = await run_schedule(plans, url, "fake-model", max_outstanding=1)
    assert [r.outcome for r in out.records] == [OK, FAILED, FAILED]
    assert [r.error for r in out.records[1:]] == [CLIENT_OVERLOAD, CLIENT_OVERLOAD]
    assert out.records[0].sent_s is not None and out.records[1].sent_s is None
    # Answers that do not arrive within the drain time are cancelled and count as unfinished.
    out = await run_schedule([PlannedRequest(0, 0.0, [1], 50)], url, "fake-model", drain_timeout_s=0.3)
    assert out.records[0].outcome == FAILED and out.records[0].error == "unfinished"


def test_the_vocabulary_from_flags_a_tokenizer_or_the_card(fake_server, capsys):
    url, state = fake_server
    base = ["bench", "serve", "--url", url, "--synthetic", "--limit", "2", "--rate", "50", "--input-len", "400",
            "--output-len", "1", "--json"]

    def sent_ids() -> set[int]:
        ids = {t for b in state["bodies"] for t in b["prompt"]}
        state["bodies"].clear()
        return ids

    # A server whose card does not say its vocabulary: a clear error, nothing sent.
    state["card"] = {"id": "fake-model", "object": "model"}
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "does not say the vocabulary of 'fake-model'" in err and "--tokenizer DIR" in err and state["n"] == 0
    assert main([*base, "--tokenizer", "demo"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["vocab_source"] == "--tokenizer demo" and out["config"]["avoid_ids"] == [256]
    ids = sent_ids()
    assert max(ids) <= 255 and len(ids) > 200
    assert main([*base, "--vocab-size", "40", "--avoid-ids", "3,7"]) == 0
    capsys.readouterr()
    assert sent_ids() == set(range(40)) - {3, 7}
    assert main([*base, "--tokenizer", "/nonexistent"]) == 2
    assert "cannot load the tokenizer of '/nonexistent'" in capsys.readouterr().err


def test_a_tokenizer_gives_its_ids_but_special_and_unused_ones(tmp_path):
    from tokenizers import Tokenizer, models
    from tsukimi.bench.serve_vocab import from_card, from_tokenizer

    from tests.unit.bpe_tokenizer import build_bpe

    (tmp_path / "bpe").mkdir()
    build_bpe().tokenizer.save(str(tmp_path / "bpe" / "tokenizer.json"))
    vocab = from_tokenizer(str(tmp_path / "bpe"), extra_avoid=[5, 10**6])
    assert vocab.size == 325 and vocab.avoid_ids == (0, 1, 2, 5)  # <|endoftext|>, <|im_start|>, <|im_end|>
    # Ids that name no token are left out too.
    (tmp_path / "words").mkdir()
    words = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 2, "c": 3, "d": 4, "[UNK]": 5}, unk_token="[UNK]"))
    words.add_special_tokens(["<s>"])
    words.save(str(tmp_path / "words" / "tokenizer.json"))
    vocab = from_tokenizer(str(tmp_path / "words"))
    assert vocab.size == 6 and vocab.avoid_ids == (1, 5)
    card = from_card({"id": "m", "vocab_size": 10, "special_token_ids": [9, 2]}, "u/v1/models")
    assert (card.size, card.avoid_ids, card.source) == (10, (2, 9), "u/v1/models")
    with pytest.raises(ValueError, match="no token id left"):
        from_card({"vocab_size": 2, "special_token_ids": [0, 1]}, "u")


def test_chat_turns_send_answers_back_and_sum_cached_tokens(fake_server, capsys):
    from tsukimi.bench import serve_chat

    url, state = fake_server
    assert serve_chat.main(["--url", url, "--conversations", "2", "--turns", "3", "--pause", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    chats = state["chats"]
    assert len(chats) == 6 and {c["model"] for c in chats} == {"fake-model"}
    # Turn 3 of conversation 0: system, user, answer, user, answer, user; the answers exactly as received.
    assert [m["role"] for m in chats[2]["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in chats[2]["messages"][2::2]] == ["answer\u20282", "answer\u20284"]
    assert chats[3]["messages"][0]["content"] != chats[0]["messages"][0]["content"]
    assert chats[0]["temperature"] == 0 and chats[3]["seed"] == 1
    # Prompts of 2, 4, 6 messages: 20, 40, 60 tokens with 0, 20, 40 cached, in each conversation.
    assert out["turns"] == [
        {"turn": 1, "conversations": 2, "prompt_tokens": 40, "cached_tokens": 0, "cached_share": 0.0},
        {"turn": 2, "conversations": 2, "prompt_tokens": 80, "cached_tokens": 40, "cached_share": 0.5},
        {"turn": 3, "conversations": 2, "prompt_tokens": 120, "cached_tokens": 80, "cached_share": 0.6667},
    ]
    assert out["later_turns"] == {"prompt_tokens": 200, "cached_tokens": 120, "cached_share": 0.6}
    assert serve_chat.main(["--url", url + "/nothing", "--turns", "1"]) == 2
    assert "HTTPStatusError" in capsys.readouterr().err

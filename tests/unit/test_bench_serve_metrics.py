"""`tsukimi bench serve`'s measurements: SSE parsing of recorded and chunked streams, TBT / percentiles /
effective capacity on hand-made timings, and the sweep's search."""

import json
import math

import numpy as np
import pytest

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

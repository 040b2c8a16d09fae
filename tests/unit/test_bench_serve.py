"""`tsukimi bench serve` as a whole: the client against a tiny fake server (rejections, overload, unfinished
answers), the vocabulary from flags, a tokenizer or the model card, and chat turns sending answers back."""

import asyncio
import json
import socket
import threading
import time

import pytest

from tsukimi.bench.serve_client import run_schedule
from tsukimi.bench.serve_record import CLIENT_OVERLOAD, FAILED, OK
from tsukimi.bench.serve_workload import PlannedRequest
from tsukimi.cli import main


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

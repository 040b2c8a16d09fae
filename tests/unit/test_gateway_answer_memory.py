"""The gateway's memory of its answers' token ids: the LRU in bytes, which ids are exactly an answer's, and turn 2
of a chat through the app carrying turn 1's prompt and answer ids."""

from __future__ import annotations

import json

import httpx
import pytest
from tsukimi.common.messages import ErrorInfo, GenerateRequest, SubmitReply, TokenEvent
from tsukimi.common.settings import Settings
from tsukimi.gateway.answer_memory import AnswerMemory, answer_ids, entry_bytes
from tsukimi.gateway.app import create_app
from tsukimi.text.tokenizer import TextTokenizer

from tests.unit.bpe_tokenizer import build_bpe
from tests.unit.test_gateway_app import FakeBus, FakeStream

# ---- the memory ----------------------------------------------------------------------------------------------


def test_entry_bytes_count_utf8_text_and_four_per_id():
    assert entry_bytes("hé", 3) == 3 + 12


def test_lru_by_bytes_evicts_the_least_recently_used():
    memory = AnswerMemory(max_bytes=3 * entry_bytes("aaaa", 4))
    for text in ("aaaa", "bbbb", "cccc"):
        assert memory.remember("m", text, [1, 2, 3, 4])
    assert memory.num_entries == 3 and memory.num_bytes == 3 * 20
    assert memory.ids_of("m", "aaaa") == [1, 2, 3, 4]  # now the most recent
    assert memory.remember("m", "dddd", [5, 6, 7, 8])
    assert memory.ids_of("m", "bbbb") is None
    assert [memory.ids_of("m", t) for t in ("aaaa", "cccc", "dddd")] == [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert memory.num_bytes == 60
    # Another model's answer of the same text is another entry; a new answer of a text replaces the old.
    assert memory.ids_of("other", "aaaa") is None
    assert memory.remember("m", "aaaa", [9])
    assert memory.ids_of("m", "aaaa") == [9] and memory.num_bytes == 60 - 12
    # Too big alone, or empty: not kept.
    assert not memory.remember("m", "x" * 61, [1])
    assert not memory.remember("m", "", [1]) and not memory.remember("m", "y", [])
    assert memory.num_entries == 3


def test_disabled_memory():
    assert not AnswerMemory(0).is_enabled and not AnswerMemory(0).remember("m", "a", [1])


# ---- which ids are exactly the answer ------------------------------------------------------------------------

DEMO = TextTokenizer.load("demo")


def exact(ids, text, is_cut=False):
    return answer_ids(ids, text, decode=DEMO.decode, eos_token_ids=[256], is_cut=is_cut)


def test_answer_ids_drop_the_final_eos_and_need_the_exact_text():
    assert exact([104, 105, 256], "hi") == [104, 105]
    assert exact([104, 105], "hi") == [104, 105]  # finished by length
    assert exact([104, 105, 256], "hj") is None
    assert exact([256], "") is None and exact([], "") is None
    # Bytes that are not UTF-8 reach the client as U+FFFD: the model's ids would not be what the client sends back.
    assert exact([104, 0xFF, 256], "h\ufffd") is None


def test_answer_ids_of_a_text_cut_by_a_stop_string():
    # "hi" then "END": the text stops before the stop string, which starts at a token boundary.
    assert exact(list(b"hiEN"), "hi", is_cut=True) == list(b"hi")
    # Not cut: the whole output must be the text.
    assert exact(list(b"hiEN"), "hi") is None
    bpe = build_bpe()
    ids = [bpe.tokenizer.token_to_id(t) for t in ("Hello", ".", "ĊĊ", "W")]
    find = lambda text: answer_ids(ids, text, decode=bpe.decode, eos_token_ids=bpe.eos_token_ids, is_cut=True)
    assert find("Hello.") == ids[:2]
    # The stop string "\nW" starts inside the "\n\n" token: the text's ids are not known.
    assert find("Hello.\n") is None


# ---- through the app -----------------------------------------------------------------------------------------

BPE = build_bpe()
IM_END = BPE.tokenizer.token_to_id("<|im_end|>")
ANSWER = [BPE.tokenizer.token_to_id(t) for t in ("Hello", ".", "ĊĊ", "W", "or", "ld")]
ANSWER_TEXT = "Hello.\n\nWorld"
TURN1 = [{"role": "user", "content": "what is the answer?"}]
TURN2 = [*TURN1, {"role": "assistant", "content": ANSWER_TEXT}, {"role": "user", "content": "Hello there!"}]


def answering(ids: list[int], finish_reason: str | None = "stop", error=None):
    """on_submit publishing `ids` (the last with `finish_reason`), or an error event after them."""

    def on_submit(request: GenerateRequest, stream: FakeStream) -> SubmitReply:
        for i, token in enumerate(ids):
            last = i == len(ids) - 1
            stream.publish(TokenEvent(request_id=request.request_id, index=i, token_id=token,
                                      finish_reason=finish_reason if last and error is None else None))
        if error is not None:
            stream.publish(TokenEvent(request_id=request.request_id, index=len(ids), error=error))
        return SubmitReply(is_accepted=True)

    return on_submit


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def gateway(bus, **settings):
    return create_app(Settings(**settings), bus, BPE)


async def chat(client, messages, stream=False, **extra) -> str:
    body = {"model": "demo", "messages": messages, "max_tokens": 50, "stream": stream, **extra}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()["choices"][0]["message"]["content"]
    chunks = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
async def test_turn_two_starts_with_turn_one_prompt_and_answer_ids(stream):
    bus = FakeBus(answering([*ANSWER, IM_END]))
    async with client_for(gateway(bus)) as client:
        assert await chat(client, TURN1, stream) == ANSWER_TEXT
        await chat(client, TURN2, stream)
    first, second = (bus.requests[rid].prompt_token_ids for rid in bus.requests)
    assert first == BPE.encode_chat(TURN1)
    assert second[: len(first) + len(ANSWER) + 1] == first + ANSWER + [IM_END]
    assert second == BPE.encode_chat(TURN2, {ANSWER_TEXT: ANSWER}.get)
    assert second != BPE.encode_chat(TURN2)  # re-encoding the text would not reuse the answer


async def test_an_answer_cut_by_a_stop_string_is_remembered_up_to_the_cut():
    bus = FakeBus(answering([*ANSWER, IM_END]))
    app = gateway(bus)
    async with client_for(app) as client:
        assert await chat(client, TURN1, stop=["ld"]) == "Hello.\n\nWor"
        turn2 = [*TURN1, {"role": "assistant", "content": "Hello.\n\nWor"}, {"role": "user", "content": "Hi"}]
        await chat(client, turn2)
    first, second = (bus.requests[rid].prompt_token_ids for rid in bus.requests)
    assert app.state.completions.answers.ids_of("demo", "Hello.\n\nWor") == ANSWER[:5]
    assert second[: len(first) + 6] == first + ANSWER[:5] + [IM_END]


async def test_failed_answers_and_a_disabled_memory_are_not_remembered():
    error = ErrorInfo(message="worker lost", type="service_unavailable", http_status=503)
    bus = FakeBus(answering(ANSWER, error=error))
    app = gateway(bus)
    async with client_for(app) as client:
        body = {"model": "demo", "messages": TURN1, "max_tokens": 50}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 503
        body["stream"] = True
        response = await client.post("/v1/chat/completions", json=body)
        assert "worker lost" in response.text
    assert app.state.completions.answers.num_entries == 0
    bus = FakeBus(answering([*ANSWER, IM_END]))
    app = gateway(bus, answer_memory_bytes=0)
    async with client_for(app) as client:
        await chat(client, TURN1)
        await chat(client, TURN2)
    assert list(bus.requests.values())[1].prompt_token_ids == BPE.encode_chat(TURN2)
    assert app.state.completions.answers.num_entries == 0

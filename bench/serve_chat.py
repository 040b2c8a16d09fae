"""`python -m tsukimi.bench.serve_chat`: multi-turn chats against an OpenAI-compatible endpoint, measuring how much
of each turn's prompt the server reused (`usage.prompt_tokens_details.cached_tokens`).

Each conversation sends its turns one after the other, every answer sent back as an assistant message of the
next turn, as a chat client does; conversations are independent (their system prompt names them). Greedy
(temperature 0) with a seed per conversation, so a run repeats. Per turn it reports the prompt tokens, the cached
ones and their share; the best a server can do on turn k is every full cache block of turn k-1's prompt and
answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass

import httpx

# Words of the filler text in the system prompt and each user turn.
SYSTEM_WORDS = 40
USER_WORDS = 48


@dataclass(frozen=True)
class Turn:
    """One answered turn of a conversation."""

    conversation: int
    index: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None


def system_prompt(conversation: int) -> str:
    filler = " ".join(["lorem ipsum"] * (SYSTEM_WORDS // 2))
    return f"You are a helpful assistant in conversation {conversation}. {filler}"


def user_prompt(turn: int) -> str:
    return f"Turn {turn}: " + " ".join(["tell me more about it"] * (USER_WORDS // 5))


async def run_conversation(client: httpx.AsyncClient, model: str, conversation: int, *, num_turns: int,
                           max_tokens: int, pause_s: float) -> list[Turn]:
    """One conversation of `num_turns` turns; raises `httpx.HTTPStatusError` on a refused turn."""
    messages = [{"role": "system", "content": system_prompt(conversation)}]
    turns = []
    for index in range(num_turns):
        messages.append({"role": "user", "content": user_prompt(index)})
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "seed": conversation}
        resp = await client.post("/v1/chat/completions", json=body)
        resp.raise_for_status()
        out = resp.json()
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        turns.append(Turn(conversation, index, usage.get("prompt_tokens", 0), details.get("cached_tokens") or 0,
                          usage.get("completion_tokens", 0), choice.get("finish_reason")))
        messages.append({"role": "assistant", "content": choice["message"]["content"]})
        if pause_s > 0 and index + 1 < num_turns:
            # NOTE: the server stores an answer's KV after it has answered; give it that moment.
            await asyncio.sleep(pause_s)
    return turns


def summarize(turns: list[Turn]) -> dict:
    """Per turn index: prompt and cached tokens summed over the conversations, and the cached share."""
    by_index: dict[int, list[Turn]] = {}
    for turn in turns:
        by_index.setdefault(turn.index, []).append(turn)
    rows = []
    for index in sorted(by_index):
        prompt = sum(t.prompt_tokens for t in by_index[index])
        cached = sum(t.cached_tokens for t in by_index[index])
        rows.append({"turn": index + 1, "conversations": len(by_index[index]), "prompt_tokens": prompt,
                     "cached_tokens": cached, "cached_share": round(cached / prompt, 4) if prompt else None})
    later = [t for t in turns if t.index > 0]
    prompt = sum(t.prompt_tokens for t in later)
    cached = sum(t.cached_tokens for t in later)
    return {"turns": rows, "later_turns": {"prompt_tokens": prompt, "cached_tokens": cached,
                                           "cached_share": round(cached / prompt, 4) if prompt else None}}


async def run(url: str, model: str | None, *, num_conversations: int, num_turns: int, max_tokens: int,
              pause_s: float, timeout_s: float) -> dict:
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout_s) as client:
        if model is None:
            from tsukimi.bench.serve_client import model_cards

            model = (await model_cards(url))[0]["id"]
        turns = []
        for conversation in range(num_conversations):
            turns += await run_conversation(client, model, conversation, num_turns=num_turns,
                                            max_tokens=max_tokens, pause_s=pause_s)
    return {"model": model, **summarize(turns), "conversations": [
        [t.__dict__ for t in turns if t.conversation == c] for c in range(num_conversations)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsukimi.bench.serve_chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    parser.add_argument("--model", help="model name (default: the first one GET /v1/models lists)")
    parser.add_argument("--conversations", type=int, default=3, help="conversations (default %(default)s)")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=150, help="answer limit (default %(default)s)")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between turns (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.conversations, args.turns, args.max_tokens) < 1:
        parser.error("--conversations, --turns and --max-tokens must be at least 1")
    try:
        result = asyncio.run(run(args.url, args.model, num_conversations=args.conversations, num_turns=args.turns,
                                 max_tokens=args.max_tokens, pause_s=args.pause, timeout_s=args.timeout))
    except (OSError, RuntimeError, ValueError, KeyError, httpx.HTTPError) as exc:
        print(f"serve_chat: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    for row in result["turns"]:
        print(f"turn {row['turn']}: {row['cached_tokens']} of {row['prompt_tokens']} prompt tokens cached "
              f"({row['cached_share']}) over {row['conversations']} conversations")
    later = result["later_turns"]
    print(f"turns 2+: {later['cached_tokens']} of {later['prompt_tokens']} cached ({later['cached_share']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

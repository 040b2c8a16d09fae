"""`tsukimi bench generate`: a running tsukimi (any OpenAI-compatible server) beside transformers' `generate` on the
same prompts, in the same run: one request's TTFT and TBT (a short and a long prompt), and output tokens/s of N
concurrent requests against `generate` batched (left-padded) and one prompt after another.

The prompts are token ids made with the checkpoint's own tokenizer and chat template and sent as `prompt` ids, so
both sides see exactly the same input; greedy outputs are compared token for token (the server's text against
`generate`'s decoded ids). `generate` runs in this process with `--threads` torch threads (the workers' default
is one each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx

from tsukimi.bench.serve_record import SseDecoder, SseLineSplitter

# Short chat prompts (one per concurrent request) and the long one's document.
TOPICS = ("the sea", "a lighthouse keeper", "the moon festival", "a lost key", "bread", "a mountain village",
          "a robot gardener", "rain in the city", "an old map", "the first snow", "a night train", "a clockmaker",
          "a fox and a crow", "a library at midnight", "a paper boat", "a desert well")
LONG_TEXT = ("The Mooncake architecture separates the prefill and decoding clusters and keeps a distributed KV "
             "cache pool in the CPU memory, DRAM and SSD of the GPU cluster. A global scheduler places each "
             "request where its time to first token is smallest, given the prefix each instance holds, its "
             "queue and the transfer time of the cache it would fetch. ")


@dataclass
class Timing:
    """One request's answer on one side."""

    text: str = ""
    ttft_s: float = 0.0
    # Mean seconds between output tokens after the first.
    tbt_s: float = 0.0
    num_tokens: int = 0
    error: str = ""


@dataclass
class CaseResult:
    """One case, both sides."""

    name: str
    num_requests: int
    num_prompt_tokens: int
    server: list[Timing] = field(default_factory=list)
    server_wall_s: float = 0.0
    generate: list[Timing] = field(default_factory=list)
    generate_wall_s: float = 0.0
    # Batched, left-padded `generate` of all prompts at once (concurrent cases): wall time and useful tokens.
    batched_wall_s: float = 0.0
    batched_tokens: int = 0
    num_equal: int = 0

    def summary(self) -> dict:
        def tps(tokens: int, wall: float) -> float:
            return round(tokens / wall, 2) if wall > 0 else 0.0
        out = {"case": self.name, "requests": self.num_requests, "prompt_tokens": self.num_prompt_tokens,
               "server_ttft_ms": _ms(statistics.median(t.ttft_s for t in self.server)),
               "server_tbt_ms": _ms(statistics.median(t.tbt_s for t in self.server)),
               "generate_ttft_ms": _ms(statistics.median(t.ttft_s for t in self.generate)),
               "generate_tbt_ms": _ms(statistics.median(t.tbt_s for t in self.generate)),
               "server_tokens_per_s": tps(sum(t.num_tokens for t in self.server), self.server_wall_s),
               "generate_sequential_tokens_per_s": tps(sum(t.num_tokens for t in self.generate),
                                                       self.generate_wall_s),
               "equal_outputs": f"{self.num_equal}/{self.num_requests}",
               "errors": [t.error for t in self.server if t.error]}
        if self.batched_wall_s:
            out["generate_batched_tokens_per_s"] = tps(self.batched_tokens, self.batched_wall_s)
        return out


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--model-dir", required=True, help="the checkpoint directory the server serves")
    parser.add_argument("--served-model", default=None, help="the `model` name to send (default: from /v1/models)")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens asked of each request")
    parser.add_argument("--long-tokens", type=int, default=1500, help="prompt tokens of the long single request")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[8, 16], help="concurrent cases")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of `generate`")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every case, server and generate in turn")
    parser.add_argument("--json", action="store_true", help="print JSON lines")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    served = args.served_model or _served_model(args.url)
    rounds: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for name, prompts in _cases(tokenizer, args, round_index):
            summary = _run_case(name, prompts, args, served, model, tokenizer).summary()
            summary["round"] = round_index + 1
            rounds.setdefault(name, []).append(summary)
            print(json.dumps(summary) if args.json else _line(summary), flush=True)
    if args.rounds > 1:
        for name, summaries in rounds.items():
            ratios = _ratios(summaries)
            print(json.dumps({"case": name, "median_of_rounds": ratios}) if args.json else
                  f"{name:>14}: median of {args.rounds} rounds: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    return 0


def _cases(tokenizer, args: argparse.Namespace, round_index: int) -> list[tuple[str, list[list[int]]]]:
    """The cases' prompts; each round's are its own (a round tag leads every prompt), so no round reuses another's
    cached prefix."""
    tag = f"(Take {round_index + 1}.) "
    cases = [("single short", [_chat_ids(tokenizer, f"{tag}Write a short story about {TOPICS[0]}.")]),
             ("single long", [_long_ids(tokenizer, args.long_tokens, tag)])]
    for n in args.concurrency:
        cases.append((f"{n} concurrent", [_chat_ids(tokenizer, f"{tag}Write a short story about "
                                                    f"{TOPICS[i % len(TOPICS)]}"
                                                    f"{'' if i < len(TOPICS) else f' (part {i // len(TOPICS) + 1})'}.")
                                          for i in range(n)]))
    return cases


def _run_case(name: str, prompts: list[list[int]], args: argparse.Namespace, served: str, model, tokenizer
              ) -> CaseResult:
    result = CaseResult(name, len(prompts), max(len(p) for p in prompts))
    result.server, result.server_wall_s = asyncio.run(_serve_all(args.url, served, prompts, args.max_tokens))
    started = time.perf_counter()
    result.generate = [_generate_one(model, tokenizer, p, args.max_tokens) for p in prompts]
    result.generate_wall_s = time.perf_counter() - started
    if len(prompts) > 1:
        result.batched_tokens, result.batched_wall_s = _generate_batched(model, tokenizer, prompts, args.max_tokens)
    result.num_equal = sum(s.text == g.text and not s.error for s, g in zip(result.server, result.generate))
    return result


def _ratios(summaries: list[dict]) -> dict:
    """Medians over rounds of the server's figures against `generate`'s (TTFT and TBT: server / generate, lower
    is better; tokens/s: server / generate batched, or one by one for single requests, higher is better)."""
    def median_of(key: str, against: str) -> float:
        values = [s[key] / s[against] for s in summaries if s.get(against)]
        return round(statistics.median(values), 3) if values else 0.0
    against = "generate_batched_tokens_per_s" if "generate_batched_tokens_per_s" in summaries[0] \
        else "generate_sequential_tokens_per_s"
    return {"ttft_x": median_of("server_ttft_ms", "generate_ttft_ms"),
            "tbt_x": median_of("server_tbt_ms", "generate_tbt_ms"),
            "tokens_per_s_x": median_of("server_tokens_per_s", against),
            "server_tokens_per_s": statistics.median(s["server_tokens_per_s"] for s in summaries),
            "generate_tokens_per_s": statistics.median(s[against] for s in summaries),
            "equal_outputs": " ".join(s["equal_outputs"] for s in summaries)}


def _line(summary: dict) -> str:
    parts = [f"{summary['case']:>14} (round {summary.get('round', 1)}): prompt {summary['prompt_tokens']} tok"]
    parts.append(f"TTFT {summary['server_ttft_ms']} ms (generate {summary['generate_ttft_ms']})")
    parts.append(f"TBT {summary['server_tbt_ms']} ms (generate {summary['generate_tbt_ms']})")
    parts.append(f"{summary['server_tokens_per_s']} tok/s (generate one by one "
                 f"{summary['generate_sequential_tokens_per_s']}"
                 + (f", batched {summary['generate_batched_tokens_per_s']}" if "generate_batched_tokens_per_s"
                    in summary else "") + ")")
    parts.append(f"equal {summary['equal_outputs']}")
    if summary["errors"]:
        parts.append(f"errors {summary['errors']}")
    return "; ".join(parts)


def _served_model(url: str) -> str:
    with httpx.Client(timeout=10) as client:
        return client.get(f"{url}/v1/models").json()["data"][0]["id"]


def _chat_ids(tokenizer, content: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _long_ids(tokenizer, num_tokens: int, tag: str = "") -> list[int]:
    """A summarisation chat of at least `num_tokens` prompt tokens."""
    text, ids = LONG_TEXT, []
    while len(ids) < num_tokens:
        ids = _chat_ids(tokenizer, f"{tag}Summarize this document in three sentences:\n\n" + text)
        text += LONG_TEXT
    return ids


async def _serve_all(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[Timing], float]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=256)) as client:
        started = time.perf_counter()
        timings = await asyncio.gather(*(_serve_one(client, url, model, p, max_tokens) for p in prompts))
        return list(timings), time.perf_counter() - started


async def _serve_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> Timing:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    timing, times = Timing(), []
    started = time.perf_counter()

    def apply(data: str | None) -> None:
        if data is None or data == "[DONE]":
            return
        event = json.loads(data)
        if event.get("error"):
            timing.error = str(event["error"])
        for choice in event.get("choices") or []:
            if choice.get("text"):
                timing.text += choice["text"]
                times.append(time.perf_counter() - started)
        if event.get("usage"):
            timing.num_tokens = event["usage"]["completion_tokens"]

    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            timing.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return timing
        lines, decoder = SseLineSplitter(), SseDecoder()
        async for chunk in resp.aiter_bytes():
            for line in lines.feed(chunk):
                apply(decoder.feed(line))
        for line in [*lines.flush(), ""]:
            apply(decoder.feed(line))
    if times:
        timing.ttft_s = times[0]
        timing.tbt_s = (times[-1] - times[0]) / max(1, timing.num_tokens - 1)
    return timing


class _TokenClock:
    """A `generate` streamer that notes when each new token is out."""

    def __init__(self):
        self.times: list[float] = []
        self._is_prompt = True

    def put(self, value) -> None:
        if self._is_prompt:
            self._is_prompt = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate_one(model, tokenizer, prompt: list[int], max_tokens: int) -> Timing:
    import torch

    clock = _TokenClock()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, streamer=clock,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, len(prompt):].tolist()
    return Timing(text=tokenizer.decode(new, skip_special_tokens=True), ttft_s=clock.times[0] - started,
                  tbt_s=(clock.times[-1] - clock.times[0]) / max(1, len(new) - 1), num_tokens=len(new))


def _generate_batched(model, tokenizer, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    """Useful output tokens (up to each row's end of text) and wall seconds of one left-padded batch."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    eos = set(_as_list(model.generation_config.eos_token_id))
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
    wall = time.perf_counter() - started
    useful = 0
    for row in out[:, width:].tolist():
        for token in row:
            useful += 1
            if token in eos:
                break
    return useful, wall


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


"""The prefill worker's chunk turns: one chunk at a time, shortest remaining prompt first."""

import asyncio
import time

import pytest

from tsukimi.prefill.chunk_scheduler import ChunkScheduler
from tsukimi.prefill.engine import PrefillEngine, PrefillStopped


class FakeJob:
    """A job of `num_chunks` chunks of `chunk` tokens that logs each step."""

    def __init__(self, name, num_chunks, chunk, log, fail_at=None):
        self.name, self.left, self.chunk, self.log, self.fail_at = name, num_chunks, chunk, log, fail_at

    @property
    def is_done(self):
        return self.left == 0

    @property
    def num_remaining(self):
        return self.left * self.chunk

    def step(self):
        if self.fail_at == self.left:
            raise PrefillStopped("stop")
        time.sleep(0.02)
        self.log.append(self.name)
        self.left -= 1


async def test_a_short_prompt_overtakes_a_long_one_between_chunks():
    scheduler, log = ChunkScheduler(), []
    long = asyncio.create_task(scheduler.run(FakeJob("long", 4, 100, log)))
    await asyncio.sleep(0.01)  # long runs its first chunk alone
    short = asyncio.create_task(scheduler.run(FakeJob("short", 1, 100, log)))
    await asyncio.gather(long, short)
    assert log == ["long", "short", "long", "long", "long"]
    assert scheduler.num_chunks == 5 and scheduler.num_waiting == 0


async def test_a_stopped_job_passes_the_turn_on():
    scheduler, log = ChunkScheduler(), []
    bad = asyncio.create_task(scheduler.run(FakeJob("bad", 3, 10, log, fail_at=2)))
    good = asyncio.create_task(scheduler.run(FakeJob("good", 2, 100, log)))
    with pytest.raises(PrefillStopped):
        await bad
    await good
    assert log.count("bad") == 1 and log.count("good") == 2


async def test_chunked_jobs_interleaved_give_the_same_results():
    from tsukimi.model.loader import build_demo_model
    from tests.unit.tiny_model import TINY

    model = build_demo_model(TINY, seed=7)
    plain = PrefillEngine(model)
    chunked = PrefillEngine(model, chunk_tokens=5)
    prompts = [list(range(1, 23)), list(range(40, 47)), list(range(60, 75))]
    scheduler = ChunkScheduler()
    jobs = [chunked.start(p) for p in prompts]
    await asyncio.gather(*(scheduler.run(j) for j in jobs))
    assert scheduler.num_chunks == 5 + 2 + 3
    for job, prompt in zip(jobs, prompts):
        assert job.result.logits.argmax() == plain.run(prompt).logits.argmax()
        assert job.result.kv[0][0].shape[2] == len(prompt)

"""The prefill worker's forwards: the prompt with the fewest tokens left goes first, a chunk at a time; short
prompts share one forward; a stopped prompt leaves the others going."""

import asyncio
import time

import pytest
import torch

from tsukimi.prefill.chunk_scheduler import ChunkScheduler, plan, urgency
from tsukimi.prefill.engine import PrefillEngine, PrefillStopped


def test_plan_packs_short_prompts_and_runs_longer_ones_alone():
    assert plan([], 512, 64) == []
    # Short prompts share a forward, whole, up to the budget.
    assert plan([10, 30, 64, 500], 512, 64) == [(0, 10), (1, 30), (2, 64)]
    assert plan([40, 50, 60], 100, 64) == [(0, 40), (1, 50)]
    # A longer prompt runs alone, a chunk of at most the budget.
    assert plan([100, 300, 2000], 512, 64) == [(0, 100)]
    assert plan([600, 900], 512, 64) == [(0, 512)]
    # Packing everything that fits: a long prompt's chunk shares the forward.
    assert plan([100, 300, 2000], 512, 10 ** 6) == [(0, 100), (1, 300)]
    # No packing.
    assert plan([10, 20], 512, 0) == [(0, 10)]
    # No chunking: one whole prompt per forward.
    assert plan([3000, 10], 0, 64) == [(0, 3000)]
    # Short prompts after a long one in the order still join a short first one.
    assert plan([10, 500, 20, 60], 100, 64) == [(0, 10), (2, 20), (3, 60)]


def test_urgency_least_slack_first_then_no_deadline_then_hopeless():
    keys = {
        "long, 0.5 s to spare": urgency(2000, 0, 0.5),
        "short, 4 s to spare": urgency(10, 1, 4.0),
        "short, 4 s to spare, later": urgency(10, 2, 4.0),
        "no deadline, long": urgency(300, 3, None),
        "no deadline, short": urgency(20, 4, None),
        "late, long": urgency(900, 5, -1.0),
        "late, short": urgency(50, 6, -3.0),
    }
    assert sorted(keys, key=keys.get) == [
        "long, 0.5 s to spare", "short, 4 s to spare", "short, 4 s to spare, later", "no deadline, short",
        "no deadline, long", "late, short", "late, long"]


class FakeJob:
    """A prompt of `num_tokens` tokens; `stop_at` its remaining tokens when it asks to stop."""

    def __init__(self, name, num_tokens, stop_at=None):
        self.name, self.num_remaining, self.stop_at = name, num_tokens, stop_at
        self.num_prefix = self.num_computed = 0

    @property
    def is_done(self):
        return self.num_remaining == 0


def fake_step(log):
    def step(parts):
        time.sleep(0.02)
        log.append([(job.name, n) for job, n in parts])
        stopped = {}
        for job, n in parts:
            if job.stop_at == job.num_remaining:
                stopped[job] = PrefillStopped(f"{job.name} stopped")
            else:
                job.num_remaining -= n
        return stopped

    return step


async def test_short_prompts_pass_a_long_one_and_share_a_forward():
    log = []
    scheduler = ChunkScheduler(fake_step(log), 100, 40)
    long = asyncio.create_task(scheduler.run(FakeJob("long", 300)))
    await asyncio.sleep(0.01)  # long runs its first chunk alone
    shorts = [asyncio.create_task(scheduler.run(FakeJob(name, n))) for name, n in (("a", 30), ("b", 20), ("c", 60))]
    await asyncio.gather(long, *shorts)
    # The short ones pass the long one; the two shortest share a forward; c (over 40) runs alone.
    assert log == [[("long", 100)], [("b", 20), ("a", 30)], [("c", 60)], [("long", 100)], [("long", 100)]]
    assert scheduler.num_forwards == 5 and scheduler.num_chunks == 6 and scheduler.num_waiting == 0


async def test_a_long_prompt_near_its_deadline_goes_before_short_ones_and_a_hopeless_one_goes_last():
    log = []
    now = [100.0]
    scheduler = ChunkScheduler(fake_step(log), 100, 0, predict_s=lambda n, done: n * 0.01, clock=lambda: now[0])
    # 300 tokens = 3 s of compute, due in 3.5 s; 50 tokens = 0.5 s due in 5 s; 400 tokens due in 2 s: hopeless.
    jobs = [asyncio.create_task(scheduler.run(FakeJob(name, n), deadline))
            for name, n, deadline in (("short", 50, 105.0), ("late", 400, 102.0), ("long", 300, 103.5))]
    await asyncio.gather(*jobs)
    assert log == [[("long", 100)], [("long", 100)], [("long", 100)], [("short", 50)],
                   [("late", 100)], [("late", 100)], [("late", 100)], [("late", 100)]]


async def test_a_stopped_job_raises_and_the_others_go_on():
    log = []
    scheduler = ChunkScheduler(fake_step(log), 50, 50)
    bad = asyncio.create_task(scheduler.run(FakeJob("bad", 20, stop_at=20)))
    good = asyncio.create_task(scheduler.run(FakeJob("good", 30)))
    with pytest.raises(PrefillStopped, match="bad stopped"):
        await bad
    await good
    assert log == [[("bad", 20), ("good", 30)]]
    assert scheduler.num_waiting == 0


async def test_a_failed_forward_fails_every_job_in_it_and_the_next_ones_run():
    calls = []

    def step(parts):
        calls.append([job.name for job, _ in parts])
        if len(calls) == 1:
            raise RuntimeError("boom")
        for job, n in parts:
            job.num_remaining -= n
        return {}

    scheduler = ChunkScheduler(step, 100, 100)
    first = [asyncio.create_task(scheduler.run(FakeJob(name, 20))) for name in ("a", "b")]
    results = await asyncio.gather(*first, return_exceptions=True)
    assert [str(r) for r in results] == ["boom", "boom"]
    await scheduler.run(FakeJob("c", 20))
    assert calls == [["a", "b"], ["c"]]


async def test_a_cancelled_run_leaves_the_next_forwards():
    log = []
    scheduler = ChunkScheduler(fake_step(log), 100)
    gone = asyncio.create_task(scheduler.run(FakeJob("gone", 1000)))
    await asyncio.sleep(0.03)
    gone.cancel()
    await scheduler.run(FakeJob("stays", 150))
    assert all(("gone", 100) not in forward for forward in log[2:])
    assert log[-2:] == [[("stays", 100)], [("stays", 50)]]
    assert scheduler.num_waiting == 0


async def test_packed_chunks_give_the_results_of_separate_prefills():
    from tsukimi.model.loader import build_demo_model
    from tests.unit.tiny_model import TINY

    model = build_demo_model(TINY, seed=7)
    plain = PrefillEngine(model)
    chunked = PrefillEngine(model, chunk_tokens=16)
    prompts = [list(range(1, 23)), list(range(40, 49)), list(range(60, 65))]
    scheduler = ChunkScheduler(chunked.step, chunked.chunk_tokens, 10)
    jobs = [chunked.start(p) for p in prompts]
    await asyncio.gather(*(scheduler.run(j) for j in jobs))
    # The 5- and 9-token prompts share a forward; the 22-token one runs alone in chunks of 16 and 6.
    assert (scheduler.num_forwards, scheduler.num_chunks) == (3, 4)
    for job, prompt in zip(jobs, prompts):
        ref = plain.run(prompt)
        assert job.result.logits.argmax() == ref.logits.argmax()
        assert torch.allclose(job.result.logits, ref.logits, atol=1e-4)
        for (k, v), (k_ref, v_ref) in zip(job.result.kv, ref.kv):
            assert k.shape == k_ref.shape == (1, 2, len(prompt), 16)
            assert torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)

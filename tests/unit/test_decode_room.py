"""Decode KV room in the conductor's view: a request's whole KV (prompt + max_tokens, whole blocks) against the
arena beside what is booked there, and against the free KV last reported less what is booked for requests not
there yet; a request larger than every arena is rejected at once. Exact expectations, no broker."""

from tsukimi.common.cost_model import CostModel
from tsukimi.common.messages import DecodeStatus, Heartbeat, PrefillStatus
from tsukimi.kvpool.pool_view import PoolView
from tsukimi.conductor.cluster import ClusterView, DecodeEntry, DecodeInstance, PrefillInstance
from tsukimi.conductor.placement import PlacementConfig, Placer, Request

# 100 bytes of KV per token, blocks of 64 tokens (6,400 bytes).
COST = CostModel(prefill_per_token_s=0.001, decode_base_s=0.01, decode_per_seq_s=0.001, kv_bytes_per_token=100,
                 source="measured")
BLOCK = 64


def decode_beat(total_blocks=32, free_blocks=32, progress=None, context=0):
    status = DecodeStatus(max_running=64, num_kv_bytes=total_blocks * BLOCK * 100,
                          num_free_kv_bytes=free_blocks * BLOCK * 100, progress=progress, num_context_tokens=context,
                          num_running=len(progress or {}))
    return Heartbeat(instance_id="d0", status=status, model="demo", host="h", cost_model=COST)


def view_with(*beats, now=0.0) -> ClusterView:
    view = ClusterView(PoolView(), block_tokens=BLOCK)
    view.observe(Heartbeat(instance_id="p0", status=PrefillStatus(), model="demo", host="h", cost_model=COST), now)
    for beat in beats:
        view.observe(beat, now)
    return view


def test_the_heartbeat_gives_the_whole_arena_and_the_free_kv_in_tokens():
    d = view_with(decode_beat(total_blocks=32, free_blocks=20)).decodes["d0"]
    assert (d.num_kv_tokens, d.num_free_kv_tokens, d.block_tokens) == (2048, 1280, 64)


def test_room_counts_whole_blocks_of_prompt_plus_output_beside_every_booking():
    d = DecodeInstance("d0", COST, max_batch_size=8, num_kv_tokens=2048, block_tokens=BLOCK)
    assert d.kv_tokens_of(1) == 64 and d.kv_tokens_of(64) == 64 and d.kv_tokens_of(65) == 128
    d.add("a", DecodeEntry(1000, 5.0, 9.0))  # 16 blocks booked, not started yet: they count all the same
    d.add("b", DecodeEntry(600, 0.0, 1.0))   # 10 blocks
    assert d.num_booked_kv_tokens() == (1664, 1664)
    assert d.has_kv_room(384) and not d.has_kv_room(385)  # 6 blocks left; 385 tokens take 7
    assert not d.can_fit(100.0, 385)  # long after both should be over: KV room is judged now
    d.finish("b")
    assert d.has_kv_room(1024) and not d.has_kv_room(1025)


def test_free_kv_reported_bounds_room_less_what_is_booked_for_requests_not_there_yet():
    view = view_with(decode_beat(total_blocks=32, free_blocks=10))
    d = view.decodes["d0"]
    assert d.has_kv_room(640) and not d.has_kv_room(641)  # 10 free blocks, nothing booked yet
    d.add("a", DecodeEntry(300, 0.0, 5.0))  # placed, not there yet: 5 blocks
    assert d.num_booked_kv_tokens() == (320, 320)
    assert d.has_kv_room(320) and not d.has_kv_room(321)
    # Decode now holds it (its progress says so): it is in the free KV it reports, not on top of it.
    view.observe(decode_beat(total_blocks=32, free_blocks=8, progress={"a": (10, 300)}, context=200), 1.0)
    assert d.entries["a"].is_seen and d.num_booked_kv_tokens() == (320, 0)
    assert d.has_kv_room(512) and not d.has_kv_room(513)


def test_whole_arena_bounds_room_when_free_kv_is_not_reported():
    d = DecodeInstance("d0", COST, max_batch_size=8, num_kv_tokens=1000)
    assert d.num_free_kv_tokens is None and d.block_tokens == 1
    assert d.has_kv_room(1000) and not d.has_kv_room(1001)
    assert d.can_ever_fit(1000) and not d.can_ever_fit(1001)


def placer(**kw) -> Placer:
    return Placer(PlacementConfig(block_tokens=BLOCK, transfer_bytes_per_s=1e9, ttft_slo_s=10, tbt_slo_s=1, **kw))


def test_placement_waits_for_room_rejects_a_request_larger_than_every_arena_and_counts_the_wait():
    prefills = [PrefillInstance("p0", COST)]
    decodes = [DecodeInstance(f"d{i}", COST, max_batch_size=8, num_kv_tokens=2048, block_tokens=BLOCK)
               for i in range(2)]
    for i, d in enumerate(decodes):
        d.add(f"x{i}", DecodeEntry(1500, 0.0, 50.0))  # 24 of 32 blocks booked on each
    fits = Request("fits", num_prompt_tokens=400, num_output_tokens=112)    # 8 blocks
    waits = Request("waits", num_prompt_tokens=400, num_output_tokens=113)  # 9 blocks
    assert placer().place(fits, 0.0, prefills, decodes, {}).decode_id == "d0"
    d = placer().place(waits, 0.0, prefills, decodes, {})
    assert (d.rejected, d.predicted_ttft_s) == ("decode_full", 0.4)
    # Waiting counts toward its TTFT: after 9.7 s of it, 0.4 s more misses the 10 s objective.
    late = Request("waits", num_prompt_tokens=400, num_output_tokens=113, waited_s=9.7)
    assert placer().place(late, 0.0, prefills, decodes, {}).rejected == "ttft_slo"
    decodes[1].finish("x1")
    assert placer().place(late, 0.0, prefills, decodes, {}).rejected == "ttft_slo"
    assert placer().place(waits, 0.0, prefills, decodes, {}).decode_id == "d1"
    # 2,049 tokens need 33 blocks: more than any arena, whatever the rejection mode.
    huge = Request("huge", num_prompt_tokens=2000, num_output_tokens=49)
    for rejection in ("none", "early", "predicted"):
        assert placer(rejection=rejection).place(huge, 0.0, prefills, decodes, {}).rejected == "kv_too_large"
    assert not placer().place(Request("edge", 2000, 48), 0.0, prefills, decodes, {}).is_rejected

"""The conductor's view of the cluster from heartbeats and pool events, and decisions made on it (no broker).
Exact expectations."""

import msgspec
import pytest

from tsukimi.common.cost_model import CostModel
from tsukimi.common.messages import (
    BlockStored, CachestoreStatus, DecodeStatus, Heartbeat, PoolEvents, PoolSnapshot, PrefillStatus,
)
from tsukimi.kvpool.pool_view import PoolView
from tsukimi.common.registry import InstanceRegistry
from tsukimi.conductor.cluster import DEFAULT_COST, ClusterView
from tsukimi.conductor.placement import PlacementConfig, Placer, Request

COST = CostModel(prefill_per_token_s=0.001, decode_base_s=0.01, decode_per_seq_s=0.001, kv_bytes_per_token=100,
                 source="measured")


def beat(iid, kind, waiting=0, running=0, model="demo", host="h1", queued_s=0.0, cost=COST, max_running=8,
         free=1 << 20, context=0):
    if kind == "prefill":
        status = PrefillStatus(num_waiting=waiting, num_running=running, max_running=max_running,
                               queued_prefill_s=queued_s)
    elif kind == "decode":
        status = DecodeStatus(num_waiting=waiting, num_running=running, max_running=max_running,
                              num_free_kv_bytes=free, num_context_tokens=context)
    else:
        status = CachestoreStatus()
    return Heartbeat(instance_id=iid, status=status, model=model, host=host, cost_model=cost,
                     kv_segment=iid if kind != "prefill" else "")


def view_with(*beats, pool=None, now=0.0):
    view = ClusterView(pool if pool is not None else PoolView())
    for b in beats:
        view.observe(b, now)
    return view


def test_heartbeats_set_queue_cost_and_kv_capacity():
    view = view_with(beat("p0", "prefill", waiting=2, queued_s=1.5), beat("p1", "prefill", cost=None),
                     beat("d0", "decode", free=10_000, context=300), now=10.0)
    assert view.prefills["p0"].busy_until == 11.5 and view.prefills["p0"].num_queued == 2
    assert view.prefills["p1"].cost == DEFAULT_COST  # not measured yet
    assert view.decodes["d0"].num_kv_tokens == 10_000 // 100 + 300
    prefills, decodes = view.serving("demo")
    assert [p.instance_id for p in prefills] == ["p0", "p1"] and [d.instance_id for d in decodes] == ["d0"]
    assert view.serving("other") == ([], [])


def test_own_placements_spread_a_burst_between_heartbeats():
    view = view_with(beat("p0", "prefill"), beat("p1", "prefill"), beat("d0", "decode"), beat("d1", "decode"))
    placer = Placer(PlacementConfig(rejection="none"))
    chosen = []
    for i in range(4):
        req = Request(f"r{i}", 100, 10)
        prefills, decodes = view.serving("demo")
        d = placer.place(req, 0.0, prefills, decodes, {})
        placer.commit(req, d, 0.0, view.prefills, view.decodes)
        chosen.append((d.prefill_id, d.decode_id))
    assert [c[0] for c in chosen] == ["p0", "p1", "p0", "p1"]
    assert len({c[1] for c in chosen[:2]}) == 2
    # The worker's next heartbeat (queue drained) replaces the conductor's own estimate.
    view.observe(beat("p1", "prefill"), 0.05)
    assert view.prefills["p1"].busy_until == 0.05


def test_idle_decode_heartbeat_clears_entries_that_should_have_started():
    view = view_with(beat("p0", "prefill"), beat("d0", "decode"))
    placer = Placer(PlacementConfig(rejection="none"))
    req = Request("r0", 100, 1000)
    d = placer.place(req, 0.0, *view.serving("demo"), {})
    placer.commit(req, d, 0.0, view.prefills, view.decodes)
    assert "r0" in view.decodes["d0"].entries
    view.observe(beat("d0", "decode", running=0), 5.0)  # it finished early (a stop string, say)
    assert view.decodes["d0"].entries == {}


def test_holdings_come_from_pool_events_by_host():
    pool = PoolView()
    pool.load(PoolSnapshot(epoch="e", seq=0, replicas=[]))
    keys = [bytes([i]) * 32 for i in range(4)]
    pool.apply(PoolEvents(epoch="e", seq=1, events=[BlockStored(k, "cs-local", "dram") for k in keys[:2]]
                          + [BlockStored(k, "cs-far", "ssd") for k in keys[:4]]))
    view = view_with(beat("p0", "prefill", host="h1"), beat("p1", "prefill", host="h2"),
                     beat("cs-local", "cachestore", host="h1"), beat("cs-far", "cachestore", host="h3"), pool=pool)
    prefills, _ = view.serving("demo")
    assert view.holdings(keys, prefills) == {"cs-local": 2, "cs-far": 4, "p0": 2, "p1": 0}
    view.forget("cs-far")
    assert view.holdings(keys, prefills) == {"cs-local": 2, "p0": 2, "p1": 0}


def test_registry_drops_silent_and_leaving_instances():
    r = InstanceRegistry(ttl_s=3.0)
    assert r.observe(beat("p0", "prefill"), now=0.0) is True
    assert r.observe(beat("p0", "prefill"), now=1.0) is False
    r.observe(beat("d0", "decode"), now=2.0)
    assert [b.instance_id for b in r.alive("prefill", now=3.9)] == ["p0"]
    assert r.expire(now=4.1) == ["p0"]
    assert r.get("p0") is None
    r.remove("d0")
    assert r.alive("decode", now=4.1) == []


def test_decode_progress_rebooks_entries_and_adopts_requests_placed_elsewhere():
    view = view_with(beat("p0", "prefill"), beat("d0", "decode"))
    placer = Placer(PlacementConfig(rejection="none"))
    for rid in ("a", "b", "c"):
        req = Request(rid, 100, 50)
        d = placer.place(req, 0.0, *view.serving("demo"), {})
        placer.commit(req, d, 0.0, view.prefills, view.decodes)
    entries = view.decodes["d0"].entries
    assert sorted(entries) == ["a", "b", "c"]
    # At t=1 decode holds a (10 tokens left) and x (placed by another conductor); b and c have not arrived.
    step = COST.decode_step_s(2, 500)
    view.observe(_with_progress(beat("d0", "decode", running=2, context=500), {"a": (10, 150), "x": (5, 300)}), 1.0)
    assert sorted(entries) == ["a", "b", "c", "x"]
    assert entries["a"].finish_at == pytest.approx(1.0 + 10 * step) and entries["a"].is_seen
    assert entries["x"].num_context_tokens == 300
    assert not entries["b"].is_seen  # still on its way
    # At t=2 a is gone (finished); b arrived; c is still coming; x still runs.
    view.observe(_with_progress(beat("d0", "decode", running=2, context=400), {"b": (49, 150), "x": (3, 300)}), 2.0)
    assert sorted(entries) == ["b", "c", "x"]
    # c never shows up: forgotten once it is more than stale_s late.
    view.stale_s = 5.0
    view.observe(_with_progress(beat("d0", "decode", running=1, context=300), {"x": (1, 300)}), 10.0)
    assert sorted(entries) == ["x"]
    assert view.decodes["d0"].load_at(10.0) == (1, 300)


def _with_progress(b, progress):
    return msgspec.structs.replace(b, status=msgspec.structs.replace(b.status, progress=progress))

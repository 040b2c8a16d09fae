"""The conductor's placement policy and the instance registry: exact expectations, no broker."""

from tsukimi.common.messages import Heartbeat
from tsukimi.common.registry import InstanceRegistry
from tsukimi.conductor.scheduler import LeastLoadedScheduler


def beat(iid, kind, waiting=0, running=0, model="demo", kv="127.0.0.1:1", max_running=8, free=1 << 30):
    return Heartbeat(instance_id=iid, kind=kind, model=model, kv_segment=kv if kind == "decode" else "",
                     num_waiting=waiting, num_running=running, max_running=max_running, num_free_kv_bytes=free)


def test_picks_least_loaded_prefill_and_decode():
    s = LeastLoadedScheduler()
    p = s.place("demo", [beat("p0", "prefill", 3), beat("p1", "prefill", 1), beat("p2", "prefill", 2)],
                [beat("d0", "decode", running=5), beat("d1", "decode", running=2, kv="10.0.0.2:7000")])
    assert p.error is None
    assert p.prefill_ids == ["p1", "p2", "p0"]
    assert (p.decode_id, p.decode_segment) == ("d1", "10.0.0.2:7000")


def test_counts_own_placements_until_next_heartbeat():
    s = LeastLoadedScheduler()
    prefills = [beat("p0", "prefill"), beat("p1", "prefill")]
    decodes = [beat("d0", "decode"), beat("d1", "decode")]
    chosen = []
    for _ in range(4):
        p = s.place("demo", prefills, decodes)
        s.on_placed(p.prefill_ids[0], p.decode_id)
        chosen.append((p.prefill_ids[0], p.decode_id))
    assert chosen == [("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]
    s.on_heartbeat(beat("p1", "prefill"))
    assert s.place("demo", prefills, decodes).prefill_ids[0] == "p1"


def test_refuses_without_a_pool_or_for_another_model():
    s = LeastLoadedScheduler()
    assert s.place("demo", [], [beat("d0", "decode")]).error.code == "no_capacity"
    no_decode = s.place("demo", [beat("p0", "prefill")], [])
    assert no_decode.error.http_status == 503 and "decode" in no_decode.error.message
    other = s.place("demo", [beat("p0", "prefill", model="other")], [beat("d0", "decode")])
    assert other.error is not None and "prefill" in other.error.message


def test_decode_load_is_relative_to_batch_capacity():
    s = LeastLoadedScheduler()
    p = s.place("demo", [beat("p0", "prefill")],
                [beat("small", "decode", running=3, max_running=4), beat("big", "decode", running=6, max_running=32)])
    assert p.decode_id == "big"


def test_registry_drops_silent_and_leaving_instances():
    r = InstanceRegistry(ttl_s=3.0)
    assert r.observe(beat("p0", "prefill"), now=0.0) is True
    assert r.observe(beat("p0", "prefill"), now=1.0) is False
    r.observe(beat("d0", "decode"), now=2.0)
    assert [b.instance_id for b in r.alive("prefill", now=3.9)] == ["p0"]
    assert r.alive("prefill", now=4.1) == []
    assert r.expire(now=4.1) == ["p0"]
    assert r.get("p0") is None
    assert [b.instance_id for b in r.alive("decode", now=4.1)] == ["d0"]
    r.remove("d0")
    assert r.alive("decode", now=4.1) == []

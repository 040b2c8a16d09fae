"""Hot block detection: demand in a sliding window, replica targets. Exact expectations."""

from tsukimi.conductor.hot_blocks import HotBlocks

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


def test_demand_raises_replicas_and_decays_with_the_window():
    hot = HotBlocks(window_s=10, requests_per_replica=2, max_keys_per_request=2)
    for t in range(5):
        hot.observe([A, B, C], now=float(t))  # C is past the first two keys: not counted
    assert (hot.demand(A), hot.demand(B), hot.demand(C)) == (5, 5, 0)
    assert hot.targets(now=5.0, max_replicas=3) == {A: 3, B: 3}
    assert hot.targets(now=5.0, max_replicas=3) == {}  # nothing changed since
    hot.observe([A], now=6.0)
    assert hot.targets(now=6.0, max_replicas=8) == {A: 4}
    # 9.5 seconds after t=4 the first four requests left the window: A has 2 (t=4, t=6), B has 1.
    assert hot.targets(now=13.5, max_replicas=8) == {A: 2, B: 1}
    assert hot.targets(now=30.0, max_replicas=8) == {A: 1, B: 1}
    assert hot.demand(A) == 0

"""Prefill's record of the decode reservations it holds (what its renewals name)."""

from tsukimi.prefill.held_reservations import HeldReservations


def test_held_reservations_by_decode_worker():
    held = HeldReservations()
    assert held.by_decode() == {} and len(held) == 0
    held.add("d1", "r2")
    held.add("d1", "r1")
    held.add("d2", "r3")
    held.add("d1", "r1")
    assert held.by_decode() == {"d1": ["r1", "r2"], "d2": ["r3"]} and len(held) == 3
    held.discard("d2", "r3")
    held.discard("d1", "r2")
    held.discard("d1", "never")
    held.discard("d9", "r1")
    assert held.by_decode() == {"d1": ["r1"]} and len(held) == 1

from tsukimi.common.expiring import ExpiringSet


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_members_expire_after_ttl_and_renew_on_add():
    clock = Clock()
    s = ExpiringSet(10.0, clock)
    s.add("a")
    clock.now = 5.0
    s.add("b")
    assert "a" in s and "b" in s and len(s) == 2
    clock.now = 10.5
    assert "a" not in s and "b" in s and len(s) == 1
    s.add("b")
    clock.now = 19.0
    assert "b" in s
    clock.now = 21.0
    assert "b" not in s and len(s) == 0

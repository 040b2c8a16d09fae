import asyncio
import threading

from tsukimi.common.compute_thread import ComputeThread


def test_every_call_runs_in_one_thread_in_order():
    compute = ComputeThread("test-compute")
    seen: list[tuple[int, int]] = []

    async def main() -> list[int]:
        calls = [compute.run(lambda i=i: seen.append((i, threading.get_ident())) or i * i) for i in range(20)]
        return await asyncio.gather(*calls)

    try:
        assert asyncio.run(main()) == [i * i for i in range(20)]
    finally:
        compute.close()
    assert [i for i, _ in seen] == list(range(20))
    assert len({ident for _, ident in seen}) == 1
    assert seen[0][1] != threading.get_ident()

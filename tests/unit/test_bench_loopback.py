"""Loopback ceiling: real bytes between two processes; block-copy bench: both copiers copy the right bytes."""

from tsukimi.bench import loopback


def test_measure_streams_whole_blocks_between_processes():
    result = loopback.measure(connections=2, block_size=1 << 16, duration_s=0.3)
    assert result["connections"] == 2 and result["block_size"] == 1 << 16
    # Whole blocks only, and many of them in 0.3 s even on a loaded machine.
    assert result["num_bytes"] % (1 << 16) == 0
    assert result["num_bytes"] >= 100 * (1 << 16)
    assert abs(result["gb_per_s"] - result["num_bytes"] / result["duration_s"] / 1e9) < 0.01


def test_an_odd_block_size_wraps_the_span_without_losing_bytes():
    # 3 MiB + 1 does not divide the 32 MiB span: the last piece of each pass is shorter.
    result = loopback.measure(connections=1, block_size=(3 << 20) + 1, duration_s=0.3)
    # More than one pass over the span, so the short piece at its end was received and counted.
    assert result["num_bytes"] > 2 * loopback.SPAN_BYTES


def test_block_copy_bench_copies_the_right_bytes_with_both_copiers():
    from tsukimi.bench import block_copy

    for copier in block_copy.COPIERS:
        assert block_copy.measure(copier, 1 << 16, 2, total_bytes=1 << 20, repeats=1) > 0

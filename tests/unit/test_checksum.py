"""Block checksums: XXH3 as written now, CRC-32 as earlier versions recorded it, anything else refused."""

import zlib

import numpy as np

from tsukimi.kvpool.checksum import block_checksum, checksum_matches


def test_the_checksum_is_xxh3_of_the_bytes_whatever_holds_them():
    data = np.arange(4096, dtype=np.uint8)
    recorded = block_checksum(data)
    assert recorded.startswith("xxh3:") and len(recorded) == 5 + 16
    assert block_checksum(data.tobytes()) == block_checksum(memoryview(data)) == recorded
    assert checksum_matches(data, recorded)
    flipped = data.copy()
    flipped[4095] ^= 1
    assert not checksum_matches(flipped, recorded)


def test_a_crc32_recorded_by_an_earlier_version_still_verifies():
    data = bytes(range(256)) * 16
    old = f"{zlib.crc32(data):08x}"
    assert checksum_matches(data, old)
    assert not checksum_matches(data[:-1] + b"\0", old)


def test_an_unknown_form_never_matches():
    data = b"kv"
    assert not checksum_matches(data, "")
    assert not checksum_matches(data, "sha1:" + "0" * 40)
    assert not checksum_matches(data, block_checksum(data)[5:])  # the digits without their name


def test_the_checksum_bench_prints_both_speeds(capsys):
    import json

    from tsukimi.bench import checksum as bench

    assert bench.main(["--bytes", "65536", "--rounds", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] == 65536 and set(result["gb_per_s"]) == {"xxh3_64", "crc32"}
    assert all(v > 0 for v in result["gb_per_s"].values())

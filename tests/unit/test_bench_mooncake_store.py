"""Helpers of the Mooncake Store harness (harness/mooncake/store*.py), on log lines captured from real runs.

Samples come from `mooncake-transfer-engine-non-cuda` 0.3.13.post1 (mooncake_master with its
built-in HTTP metadata server). Nothing here needs Mooncake; the one real run is skipped when the
wheel or its libraries are missing, or unless TSUKIMI_MOONCAKE_STORE_REAL=1.
"""

from __future__ import annotations

import math
import os

import pytest
from harness.mooncake import store as ms
from harness.mooncake.store_master import (
    ENV_MASTER,
    find_master_binary,
    master_command,
    master_fatal_line,
    parse_master_ready,
)
from harness.mooncake.store_results import check_status, latency_summary, make_result, percentile, throughput
from harness.mooncake.store_spec import (
    API_CALLS,
    APIS,
    DEFAULT_BATCH_SIZE,
    OPS,
    MooncakeStoreBenchError,
    MooncakeStoreUnavailable,
    chunks,
    effective_batch_size,
    make_keys,
    memcpy_env,
    metadata_server_url,
    segment_sizes,
)
from harness.mooncake.wheel import loader_error

MASTER_LOG = """\
WARNING: Logging before InitGoogleLogging() is written to STDERR
I1125 00:12:54.392601 13918 master.cpp:1522] Master service started on port 50551, max_threads=2, enable_metric_reporting=1, metrics_port=9113, enable_http_metadata_server=1, http_metadata_server_port=8181
I1125 00:12:54.392757 13918 master.cpp:1374] Starting C++ HTTP metadata server on 127.0.0.1:8181
I1125 00:12:54.393599 13918 http_metadata_server.cpp:126] HTTP metadata server started on 127.0.0.1:8181
I1125 00:12:54.393613 13918 master.cpp:1383] C++ HTTP metadata server started successfully
"""


def test_parse_master_ready_with_http_metadata():
    assert parse_master_ready(MASTER_LOG) == {"rpc_port": 50551, "http_host": "127.0.0.1", "http_port": 8181}


def test_parse_master_ready_waits_for_http_line():
    first = MASTER_LOG.splitlines()[1] + "\n"
    assert parse_master_ready(first) is None
    assert parse_master_ready(first, http_metadata=False) == {
        "rpc_port": 50551,
        "http_host": None,
        "http_port": None,
    }
    assert parse_master_ready("") is None


def test_master_fatal_line():
    assert master_fatal_line(MASTER_LOG) is None
    log = MASTER_LOG + "F1125 00:12:55.000000 13918 master.cpp:99] Check failed: ok\n"
    assert master_fatal_line(log).startswith("F1125")


def test_loader_error():
    out = "mooncake_master: error while loading shared libraries: libibverbs.so.1: cannot open shared object file"
    assert loader_error(out) == "libibverbs.so.1"
    assert loader_error("fine") is None
    assert ms._import_missing_lib(
        "ImportError: libnuma.so.1: cannot open shared object file: No such file or directory"
    ) == "libnuma.so.1"


def test_master_command():
    cmd = master_command("/x/mooncake_master", 5000, 5001, 5002)
    assert cmd[0] == "/x/mooncake_master"
    assert "--rpc_port=5000" in cmd and "--metrics_port=5001" in cmd
    assert "--enable_http_metadata_server=true" in cmd and "--http_metadata_server_port=5002" in cmd
    assert "--rpc_address=127.0.0.1" in cmd and "--metrics_host=127.0.0.1" in cmd
    no_http = master_command("m", 1, 2, None)
    assert not any("http_metadata" in a for a in no_http)


def test_metadata_server_url():
    assert metadata_server_url("http", "127.0.0.1", 8181) == "http://127.0.0.1:8181/metadata"
    assert metadata_server_url("p2p") == "P2PHANDSHAKE"
    with pytest.raises(ValueError):
        metadata_server_url("http")
    with pytest.raises(ValueError):
        metadata_server_url("etcd", http_port=1)


def test_memcpy_env():
    assert memcpy_env("auto") == {}
    assert memcpy_env("on") == {"MC_STORE_MEMCPY": "1"}
    assert memcpy_env("off") == {"MC_STORE_MEMCPY": "0"}
    with pytest.raises(ValueError):
        memcpy_env("maybe")


def test_effective_batch_size():
    assert effective_batch_size(False, 64, 256) == 1
    assert effective_batch_size(True, None, 256) == DEFAULT_BATCH_SIZE
    assert effective_batch_size(True, 64, 16) == 16
    assert effective_batch_size(True, 8, 256) == 8
    with pytest.raises(ValueError):
        effective_batch_size(True, 0, 256)


def test_segment_sizes():
    seg, local = segment_sizes(4 << 20, 256, 32, "bytes")
    assert seg >= 2 * (4 << 20) * 256 and seg % (1 << 20) == 0
    assert local >= 2 * 32 * (4 << 20)
    seg_b, local_b = segment_sizes(4 << 20, 256, 32, "buffer")
    assert seg_b == seg and local_b == 64 << 20


def test_keys_and_chunks():
    a = make_keys("p", 0, 4)
    b = make_keys("p", 1, 4)
    assert len(set(a + b)) == 8
    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert chunks([], 3) == []
    with pytest.raises(ValueError):
        chunks([1], 0)


def test_percentile_and_latency_summary():
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 0) == 3.0
    assert math.isnan(percentile([], 50))
    s = latency_summary([0.001, 0.003, 0.002])
    assert s["p50"] == 2000.0 and s["max"] == 3000.0 and s["mean"] == 2000.0
    assert latency_summary([])["p50"] is None


def test_throughput_and_result():
    ops_s, gb_s = throughput(1000, 262144, 2.0)
    assert ops_s == 500.0
    assert gb_s == pytest.approx(1000 * 262144 / 2.0 / 1e9)
    with pytest.raises(ValueError):
        throughput(1, 1, 0.0)
    r = make_result("get", 4 << 20, True, 32, 512, 16, 1.0, [0.01] * 16, "buffer", rounds=2)
    assert r["system"] == "mooncake-store" and r["op"] == "get" and r["batch"] is True
    assert r["calls_used"] == "batch_get_into" and r["rounds"] == 2
    assert r["bytes"] == 512 * (4 << 20)
    assert r["gb_per_s"] == pytest.approx(512 * (4 << 20) / 1e9, rel=1e-3)


def test_api_calls_cover_every_combination():
    for api in APIS:
        for batch in (False, True):
            for op in OPS:
                assert (api, batch, op) in API_CALLS


def test_check_status():
    check_status("put", 0)
    check_status("batch_put_from", [0, 0])
    check_status("get_into", 262144)
    with pytest.raises(MooncakeStoreBenchError):
        check_status("put", -600)
    with pytest.raises(MooncakeStoreBenchError):
        check_status("batch_put_from", [0, -704])


def test_master_override_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_MASTER, str(tmp_path / "nope"))
    with pytest.raises(MooncakeStoreUnavailable):
        find_master_binary()


def test_bad_arguments_rejected_before_starting_anything():
    with pytest.raises(ValueError):
        ms.run_mooncake_store_ops(0, 1, False, 1.0)
    with pytest.raises(ValueError):
        ms.run_mooncake_store_ops(1024, 1, False, 1.0, ops=("scan",))
    with pytest.raises(ValueError):
        ms.run_mooncake_store_bench(1024, 1, False, 1.0, op="scan")


@pytest.mark.skipif(os.environ.get("TSUKIMI_MOONCAKE_STORE_REAL") != "1", reason="set TSUKIMI_MOONCAKE_STORE_REAL=1")
def test_real_run_small():
    try:
        results = ms.run_mooncake_store_ops(65536, 16, True, 0.5, batch_size=8)
    except MooncakeStoreUnavailable as exc:
        pytest.skip(f"mooncake store unavailable: {exc.reason}")
    assert [r["op"] for r in results] == ["put", "get"]
    for r in results:
        assert r["ops"] > 0 and r["gb_per_s"] > 0

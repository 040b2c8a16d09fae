"""Parsers of Mooncake's transfer_engine_bench output, on lines captured from real runs.

The samples come from `mooncake-transfer-engine-non-cuda` 0.3.13.post1 on this project's machine
(loopback, --protocol=tcp --metadata_server=P2PHANDSHAKE). Nothing here needs Mooncake installed.
"""

from __future__ import annotations

import pytest
from harness.mooncake import engine
from harness.mooncake.engine_log import (
    parse_rpc_endpoint,
    parse_rpc_port,
    parse_throughput,
    target_buffers_started,
    to_gb_per_s,
)
from harness.mooncake.wheel import MooncakeUnavailable, loader_error

# A target started with --local_server_name=127.0.0.1:12345: it listens for RPC on 16171, not 12345.
TARGET_LOG = """\
WARNING: Logging before InitGoogleLogging() is written to STDERR
I1124 23:00:53.513409 16288 transfer_engine_impl.cpp:1046] Metrics reporting is disabled (set MC_TE_METRIC=1 to enable)
I1124 23:00:53.513502 16288 transfer_engine_impl.cpp:116] Transfer Engine parseHostNameWithPort. server_name: 127.0.0.1 port: 12345
I1124 23:00:53.513607 16288 transfer_engine_impl.cpp:183] Transfer Engine RPC using P2P handshake, listening on 127.0.0.1:16171
E1124 23:00:53.513712 16288 transfer_metadata.cpp:1098] Local segment descriptor not found
I1124 23:00:53.513748 16288 tcp_transport.cpp:391] TcpTransport: listen on port 15981
I1124 23:00:53.513943 16288 transfer_engine_bench.cpp:335] DRAM is used, numa node num: 1
"""

# An initiator with the default --report_unit=GB --report_precision=2.
INITIATOR_LOG = """\
WARNING: Logging before InitGoogleLogging() is written to STDERR
I1124 23:01:00.281414 16381 transfer_engine_impl.cpp:1046] Metrics reporting is disabled (set MC_TE_METRIC=1 to enable)
I1124 23:01:00.281533 16381 transfer_engine_impl.cpp:116] Transfer Engine parseHostNameWithPort. server_name: 127.0.0.1 port: 12346
I1124 23:01:00.281618 16381 transfer_engine_impl.cpp:183] Transfer Engine RPC using P2P handshake, listening on 127.0.0.1:15085
E1124 23:01:00.281750 16381 transfer_metadata.cpp:1098] Local segment descriptor not found
I1124 23:01:00.281780 16381 tcp_transport.cpp:391] TcpTransport: listen on port 16230
I1124 23:01:00.282045 16381 transfer_engine_bench.cpp:335] DRAM is used, numa node num: 1
I1124 23:01:03.290212 16385 transfer_engine_bench.cpp:440] Worker 0 stopped!
I1124 23:01:03.317260 16386 transfer_engine_bench.cpp:440] Worker 1 stopped!
I1124 23:01:03.317585 16381 transfer_engine_bench.cpp:569] Test completed: duration 3.03, batch count 94, throughput 1.04 GB/s
I1124 23:01:03.319077 16381 transfer_metadata.cpp:616] removeSegmentDesc 127.0.0.1:15085 finish
"""

# What `run_mooncake_bench` passes: --report_unit=GB --report_precision=4 (64 KiB blocks, batch 32, read).
INITIATOR_RESULT_PRECISE = (
    "I1124 23:02:44.546850 19389 transfer_engine_bench.cpp:569] Test completed: duration 3.01, "
    "batch count 588, throughput 0.4102 GB/s"
)

# An initiator pointed at the target's --local_server_name port instead of its RPC port.
INITIATOR_WRONG_SEGMENT = """\
I1124 23:01:06.377439 16526 transfer_engine_bench.cpp:335] DRAM is used, numa node num: 1
E1124 23:01:06.377785 16526 transfer_metadata_plugin.cpp:1030] SocketHandShakePlugin: connect()127.0.0.1:12345: Connection refused [111]
E1124 23:01:06.378223 16530 transfer_engine_bench.cpp:393] Unable to get target segment ID, please recheck
"""


def test_rpc_port_is_the_logged_listener_not_local_server_name():
    assert parse_rpc_port(TARGET_LOG) == 16171
    assert parse_rpc_endpoint(TARGET_LOG) == ("127.0.0.1", 16171)
    # 12345 (local_server_name) and 15981 (the TCP data port) are not the segment's address.
    assert parse_rpc_port(TARGET_LOG) not in (12345, 15981)


def test_rpc_port_variants():
    # Older builds log an empty host; other deployments log a real address.
    assert parse_rpc_endpoint(
        "I1017 11:38:42.199313 1316125 transfer_engine.cpp:146] Transfer Engine RPC using P2P handshake, "
        "listening on :16683"
    ) == ("", 16683)
    assert (
        parse_rpc_port(
            "I0227 11:31:26.136366 1021616 transfer_engine_impl.cpp:172] Transfer Engine RPC using P2P handshake, "
            "listening on 10.99.91.35:15395"
        )
        == 15395
    )
    assert parse_rpc_endpoint("Transfer Engine RPC using P2P handshake, listening on [::1]:15002") == (
        "::1",
        15002,
    )


def test_rpc_port_absent_before_the_line_is_logged():
    partial = TARGET_LOG.split("Transfer Engine RPC")[0]
    assert parse_rpc_port(partial) is None
    assert parse_rpc_port("") is None


def test_target_ready_marker():
    assert target_buffers_started(TARGET_LOG)
    assert not target_buffers_started(TARGET_LOG.split("I1124 23:00:53.513943")[0])


def test_parse_throughput_default_precision():
    r = parse_throughput(INITIATOR_LOG)
    assert r is not None
    assert r["duration_s"] == 3.03
    assert r["batch_count"] == 94
    assert r["rate"] == 1.04
    assert r["unit"] == "GB/s"
    assert r["gb_per_s"] == pytest.approx(1.04)
    assert r["raw"].startswith("I1124 23:01:03.317585") and r["raw"].endswith("throughput 1.04 GB/s")
    # The printed rate is batch_count * batch_size * block_size / duration in 1e9 bytes (1 MiB, 32/batch).
    assert 94 * 32 * (1 << 20) / 3.03 / 1e9 == pytest.approx(r["gb_per_s"], abs=0.005)


def test_parse_throughput_precise():
    r = parse_throughput("noise\n" + INITIATOR_RESULT_PRECISE + "\n")
    assert r == {
        "duration_s": 3.01,
        "batch_count": 588,
        "rate": 0.4102,
        "unit": "GB/s",
        "gb_per_s": pytest.approx(0.4102),
        "raw": INITIATOR_RESULT_PRECISE,
    }
    # The logged duration is rounded to 10 ms, so recomputing from it is only good to ~0.2%; the printed
    # rate used the exact duration, which is why gb_per_s comes from the rate.
    assert 588 * 32 * 65536 / 3.01 / 1e9 == pytest.approx(r["gb_per_s"], rel=2e-3)


def test_parse_throughput_absent():
    assert parse_throughput(TARGET_LOG) is None
    assert parse_throughput(INITIATOR_WRONG_SEGMENT) is None
    assert parse_throughput("") is None


@pytest.mark.parametrize(
    ("value", "unit", "gb"),
    [
        (1.04, "GB", 1.04),
        (1.04, "GB/s", 1.04),
        (1.0, "GiB", 1.073741824),
        (8.0, "Gb", 1.0),
        (1040.0, "MB", 1.04),
        (1024.0, "MiB", 1.073741824),
        (8000.0, "Mb", 1.0),
        (1e6, "KB", 1.0),
        (1048576.0, "KiB", 1.073741824),
    ],
)
def test_units_convert_to_1e9_bytes_per_second(value, unit, gb):
    assert to_gb_per_s(value, unit) == pytest.approx(gb)


def test_unit_in_a_line_is_converted():
    line = "I1124 23:02:44.546850 19389 transfer_engine_bench.cpp:569] Test completed: duration 2.00, batch count 10, throughput 500.00 MiB/s"
    r = parse_throughput(line)
    assert r["unit"] == "MiB/s"
    assert r["gb_per_s"] == pytest.approx(500 * 2**20 / 1e9)


def test_unknown_unit_rejected():
    with pytest.raises(ValueError):
        to_gb_per_s(1.0, "TB")


def test_loader_error():
    text = (
        "/usr/lib/python3/site-packages/mooncake/transfer_engine_bench: error while loading shared libraries: "
        "libibverbs.so.1: cannot open shared object file: No such file or directory"
    )
    assert loader_error(text) == "libibverbs.so.1"
    assert loader_error(TARGET_LOG) is None


def test_unavailable_when_override_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(engine.ENV_BINARY, str(tmp_path / "nope"))
    with pytest.raises(MooncakeUnavailable):
        engine.run_mooncake_bench(duration_s=1)


def test_unavailable_when_libraries_missing(monkeypatch, tmp_path):
    fake = tmp_path / "transfer_engine_bench"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "$0: error while loading shared libraries: librdmacm.so.1: cannot open shared object file: '
        'No such file or directory" >&2\nexit 127\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv(engine.ENV_BINARY, str(fake))
    with pytest.raises(MooncakeUnavailable, match="librdmacm.so.1"):
        engine.run_mooncake_bench(duration_s=1)


def test_memcpy_smoke():
    pytest.importorskip("numpy")
    from harness.mooncake.memcpy import measure_memcpy

    r = measure_memcpy(1 << 20, repeats=3)
    assert r["system"] == "memcpy" and r["size_bytes"] == 1 << 20 and len(r["samples_gb_per_s"]) == 3
    assert r["gb_per_s"] > 0


FAKE_BENCH = """\
#!{python}
# Stands in for transfer_engine_bench: replays captured log lines and checks the initiator's flags.
import signal, sys, time
args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in sys.argv[1:])
if "version" in args:
    print("transfer_engine_bench")
    sys.exit(0)
if args.get("mode") == "target":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.stderr.write({target_log!r})
    sys.stderr.flush()
    while True:
        time.sleep(1)
if args.get("segment_id") != "127.0.0.1:16171":
    sys.stderr.write({wrong!r})
    sys.exit(1)
assert args["operation"] == "read" and args["block_size"] == "65536" and args["report_unit"] == "GB", args
sys.stderr.write({result!r} + "\\n")
"""


def test_run_against_a_fake_bench_uses_the_logged_rpc_port(monkeypatch, tmp_path):
    import sys

    fake = tmp_path / "transfer_engine_bench"
    fake.write_text(
        FAKE_BENCH.format(
            python=sys.executable,
            target_log=TARGET_LOG,
            wrong=INITIATOR_WRONG_SEGMENT,
            result=INITIATOR_RESULT_PRECISE,
        )
    )
    fake.chmod(0o755)
    monkeypatch.setenv(engine.ENV_BINARY, str(fake))
    r = engine.run_mooncake_bench(op="read", block_size=65536, duration_s=1, settle_s=0)
    assert r["system"] == "mooncake" and r["transport"] == "tcp" and r["op"] == "read"
    assert (r["block_size"], r["batch_size"], r["threads"]) == (65536, 32, 2)
    assert r["segment_id"] == "127.0.0.1:16171"
    assert r["gb_per_s"] == pytest.approx(0.4102)
    assert r["duration_s"] == 3.01
    assert r["raw"] == INITIATOR_RESULT_PRECISE

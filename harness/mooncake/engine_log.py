"""What Mooncake's `transfer_engine_bench` logs, read back: the target's RPC endpoint, the initiator's result.

With P2PHANDSHAKE the port in the target's `--local_server_name` is NOT where it listens: the
engine binds a random RPC port and logs it as

    ... transfer_engine_impl.cpp:183] Transfer Engine RPC using P2P handshake, listening on 127.0.0.1:16171

and the initiator must name the target segment by that address. The initiator ends with

    ... transfer_engine_bench.cpp:569] Test completed: duration 3.03, batch count 94, throughput 1.04 GB/s

where the rate is batch_count * batch_size * block_size / duration in `--report_unit`; "GB" is
1e9 bytes (the bench's table: GB=1e9, GiB=2^30, Gb=1e9/8, MB=1e6, MiB=2^20, Mb=1e6/8, KB, KiB, Kb).
"""

from __future__ import annotations

import re

# transfer_engine_bench.cpp's RATE_UNIT_MP: bytes per unit of `--report_unit`.
RATE_UNITS: dict[str, float] = {
    "GB": 1e9,
    "GiB": float(1 << 30),
    "Gb": 1e9 / 8,
    "MB": 1e6,
    "MiB": float(1 << 20),
    "Mb": 1e6 / 8,
    "KB": 1e3,
    "KiB": float(1 << 10),
    "Kb": 1e3 / 8,
}

# "Transfer Engine RPC using P2P handshake, listening on 127.0.0.1:16171"; older builds may log an
# empty host ("listening on :16683"), an IPv6 one may be bracketed ("[::1]:16171").
_RPC_RE = re.compile(r"RPC using P2P handshake, listening on (\[[^\]]*\]|[^\s:]*):(\d+)")

# "Test completed: duration 3.03, batch count 94, throughput 1.04 GB/s"
_RESULT_RE = re.compile(
    r"Test completed: duration (?P<duration>[\d.]+), batch count (?P<batches>\d+), "
    r"throughput (?P<rate>[\d.]+) (?P<unit>[A-Za-z]+)/s"
)

# Logged by the target after the transport is installed, right before it allocates and registers
# its buffers (there is no log line after registration).
_TARGET_BUFFERS_RE = re.compile(r"(DRAM|VRAM) is used")


def parse_rpc_endpoint(log_text: str) -> tuple[str, int] | None:
    """(host, port) of the P2P-handshake RPC listener a transfer engine logged, or None.

    The host is as logged ("" when the engine logged none, brackets stripped for IPv6)."""
    m = _RPC_RE.search(log_text)
    if not m:
        return None
    return m.group(1).strip("[]"), int(m.group(2))


def parse_rpc_port(log_text: str) -> int | None:
    """The RPC port of the P2P-handshake listener in a target's log: the initiator's segment_id port."""
    endpoint = parse_rpc_endpoint(log_text)
    return endpoint[1] if endpoint else None


def target_buffers_started(log_text: str) -> bool:
    """Whether the target has reached buffer allocation (logged just before it registers memory)."""
    return _TARGET_BUFFERS_RE.search(log_text) is not None


def to_gb_per_s(value: float, unit: str) -> float:
    """A rate printed by the bench in `unit`/s (e.g. "GB", "MiB", "Gb") as GB/s of 1e9 bytes/s."""
    unit = unit.removesuffix("/s")
    if unit not in RATE_UNITS:
        raise ValueError(f"unknown transfer_engine_bench rate unit {unit!r}")
    return value * RATE_UNITS[unit] / 1e9


def parse_throughput(output: str) -> dict | None:
    """The initiator's result line, or None when absent.

    Returns {"duration_s", "batch_count", "rate", "unit", "gb_per_s", "raw"}; gb_per_s is the
    printed rate converted to 1e9 bytes/s, and raw the whole log line holding it."""
    for line in output.splitlines():
        m = _RESULT_RE.search(line)
        if m:
            rate = float(m.group("rate"))
            unit = m.group("unit")
            return {
                "duration_s": float(m.group("duration")),
                "batch_count": int(m.group("batches")),
                "rate": rate,
                "unit": f"{unit}/s",
                "gb_per_s": to_gb_per_s(rate, unit),
                "raw": line.strip(),
            }
    return None

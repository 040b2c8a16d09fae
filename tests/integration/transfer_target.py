"""A transfer-engine target process for the two-process tests: registers buffers, publishes, waits for SIGTERM.

argv: NATS URL, segment name, secret (hex). Prints one JSON line with its buffer ids when ready.
"""

import asyncio
import json
import signal
import sys

import nats
import numpy as np

from tsukimi.transfer.engine import TransferEngine
from tsukimi.transfer.metadata import NatsMetadataStore

SIZE = 8 << 20
# A bucket of these tests' own, so its 2 s TTL is not the one another test created the shared bucket with.
BUCKET = "tsukimi_test_segments"


def read_only_pattern() -> bytes:
    return np.random.default_rng(5).integers(0, 256, SIZE, dtype=np.uint8).tobytes()


async def main(url: str, segment: str, secret: bytes) -> None:
    nc = await nats.connect(url)
    engine = TransferEngine(segment, secret, NatsMetadataStore(nc, ttl_s=2.0, bucket=BUCKET), heartbeat_s=0.5, timeout_s=3.0)
    # Notifications are echoed on stdout so the test can see them arrive (after the data).
    engine.on_notify = lambda payload: print(json.dumps({"notified": payload.hex(),
                                                         "first_byte": shared.view[0]}), flush=True)
    await engine.start()
    shared = engine.allocate(SIZE)
    private = engine.register(bytearray(SIZE))
    frozen = engine.register(bytearray(read_only_pattern()), read_only=True)
    await engine.publish()
    print(json.dumps({"shared": shared.buffer_id, "private": private.buffer_id, "read_only": frozen.buffer_id,
                      "address": engine.address}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await engine.close()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])))

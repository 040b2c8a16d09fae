"""The session lane's framing, shared by the cachestore's server (services/cachestore/session_lane.py) and
`PoolSession`: `CacheStore.Session`'s protobuf messages over a plain TCP stream, each after its length (4 bytes,
big-endian), once the transfer engine's HMAC handshake (with this magic) has passed."""

from __future__ import annotations

import asyncio
import struct

MAGIC = b"TSKS"
FRAME = struct.Struct(">I")
# Largest message either side accepts (a batch of ~100k keys).
MAX_FRAME_BYTES = 64 << 20
# Bytes a writer lets queue for a slow reader before it waits for them to go.
DRAIN_BYTES = 1 << 20


def frame(message) -> bytes:
    """A protobuf message as one frame."""
    data = message.SerializeToString()
    return FRAME.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame's message bytes; IncompleteReadError when the stream ends, ValueError for a frame over
    MAX_FRAME_BYTES (the stream is then out of step: close it)."""
    (n,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    if n > MAX_FRAME_BYTES:
        raise ValueError(f"a session lane frame of {n} bytes (at most {MAX_FRAME_BYTES})")
    return await reader.readexactly(n)

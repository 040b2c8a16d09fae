"""Typed messages on the bus (msgpack-encoded msgspec structs). Subjects are listed in `subjects.py`."""

from __future__ import annotations

from typing import Literal, TypeVar

import msgspec

from tsukimi.common.cost_model import CostModel

SCHEMA_VERSION = 1

FinishReason = Literal["stop", "length"]
InstanceKind = Literal["prefill", "decode", "cachestore", "conductor"]


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of every bus message."""

    # Schema version of the sender; a receiver refuses a newer major version it cannot read.
    schema_version: int = SCHEMA_VERSION


class SamplingParams(msgspec.Struct, kw_only=True):
    """How one request picks its tokens; workers apply it per request inside a shared batch."""

    # 0 means greedy (argmax).
    temperature: float = 1.0
    # Nucleus sampling mass, in (0, 1].
    top_p: float = 1.0
    # Seed of the per-token random stream; the gateway always sets one, so a request is reproducible.
    seed: int = 0
    # Most tokens to generate, the first one (from prefill) included.
    max_tokens: int = 16
    # Token ids that end the request with finish_reason "stop" (the model's EOS ids).
    stop_token_ids: list[int] = []


class ErrorInfo(msgspec.Struct, kw_only=True):
    """An error to show the client in the OpenAI error envelope."""

    # Human-readable explanation.
    message: str
    # OpenAI error type, e.g. "invalid_request_error", "server_error", "service_unavailable".
    type: str = "server_error"
    # Machine-readable code, e.g. "no_capacity".
    code: str | None = None
    # HTTP status the gateway answers with.
    http_status: int = 500
    # Seconds after which a retry may succeed (sent as Retry-After); 0: no hint.
    retry_after_s: float = 0.0


class KVLayout(msgspec.Struct, frozen=True):
    """Shape of one request's KV bytes: per layer K then V, each [num_kv_heads, seq_len, head_dim]."""

    # Decoder layers.
    num_layers: int
    # KV heads per layer.
    num_kv_heads: int
    # Tokens covered.
    seq_len: int
    # Size of one head.
    head_dim: int
    # Element type: "float32", "bfloat16" or "float16".
    dtype: str

    @property
    def element_size(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]

    @property
    def num_bytes(self) -> int:
        """Size of the whole buffer."""
        return 2 * self.num_layers * self.num_kv_heads * self.seq_len * self.head_dim * self.element_size


class GenerateRequest(Message):
    """Gateway -> conductor: one tokenized request to place."""

    # Gateway-assigned id, also the `X-Request-Id` and the key of its stream subject.
    request_id: str
    # Served model name the client asked for.
    model: str
    # Prompt after the chat template and tokenization.
    prompt_token_ids: list[int]
    # Sampling settings of this request.
    sampling: SamplingParams
    # Wall-clock time (unix seconds) the gateway received it.
    arrival_time: float


class SubmitReply(Message):
    """Conductor -> gateway: where the request runs, or why it does not."""

    # True when a prefill and a decode worker accepted it.
    is_accepted: bool
    # Chosen prefill instance.
    prefill_id: str | None = None
    # Chosen decode instance.
    decode_id: str | None = None
    # Why it was refused, when it was.
    error: ErrorInfo | None = None


class PrefillTask(Message):
    """Conductor -> prefill worker: compute a prompt's KV cache and first token, hand it to a decode worker."""

    # The request.
    request: GenerateRequest
    # Decode instance that continues it.
    decode_id: str
    # Transfer-engine segment of that decode instance (where the KV is written).
    decode_segment: str


class KVReserve(Message):
    """Prefill -> decode worker: reserve KV blocks for a request before writing its KV into them."""

    # The request.
    request_id: str
    # Tokens whose KV prefill will write.
    num_tokens: int


class KVReservation(Message):
    """Decode worker -> prefill: where to write the KV, or why not."""

    # True when blocks were reserved.
    is_accepted: bool
    # Buffer of the decode worker's segment holding its KV blocks.
    buffer_id: int = 0
    # The reserved blocks, in token order; block i starts at byte block_ids[i] * block_bytes of that buffer and
    # holds tokens [i * block_tokens, (i + 1) * block_tokens) packed as the cache pool packs a block.
    block_ids: list[int] = []
    # Tokens per block.
    block_tokens: int = 0
    # Bytes per block.
    block_bytes: int = 0
    # Why not ("kv_full" when the blocks are all in use: worth asking again shortly).
    error: ErrorInfo | None = None
    # This reservation's identity: the owner tag every write into its blocks must carry (the decode worker's
    # write guard refuses writes into blocks of another reservation or freed ones).
    nonce: int = 0


class KVRenew(Message):
    """Prefill -> decode worker, every `kv_orphan_ttl_s` / 4: reservations still held by a live writer (writing,
    or about to hand over or release them); the decode worker frees only those silent for `kv_orphan_ttl_s`."""

    # The requests whose reservations on that decode worker prefill holds.
    request_ids: list[str]


class KVRelease(Message):
    """Prefill -> decode worker: free a reservation that will not be handed over (cancelled, failed, finished at
    the first token). Sent only once no write into its blocks is in flight."""

    # The request.
    request_id: str


class DecodeTask(Message):
    """Prefill -> decode worker: continue a request whose KV cache has already been written to its reservation."""

    # The request.
    request: GenerateRequest
    # Token sampled by prefill (index 0 of the output).
    first_token_id: int
    # Tokens whose KV was delivered (the prompt).
    num_kv_tokens: int
    # Shape of the delivered KV.
    kv_layout: KVLayout
    # Prompt tokens whose KV prefill reused instead of computing.
    num_cached_tokens: int = 0


class TaskAck(Message):
    """Worker -> sender of a task: taken or refused."""

    # True when the worker queued the task.
    is_accepted: bool
    # Why it refused.
    error: ErrorInfo | None = None


class TokenEvent(Message):
    """Worker -> gateway: the next output token of a request, or its end."""

    # The request.
    request_id: str
    # Position in the output (0 = first generated token); lets the gateway order events of two senders.
    index: int
    # The token, absent on an error event.
    token_id: int | None = None
    # Set on the last event of the request.
    finish_reason: FinishReason | None = None
    # Prompt tokens served from cache (reported on index 0).
    num_cached_tokens: int = 0
    # Set when the request failed; it is the last event.
    error: ErrorInfo | None = None


class CancelRequest(Message):
    """Gateway -> everyone: stop working on a request and free what it holds."""

    # The request.
    request_id: str
    # Why: "client_disconnected", "stop_string", "timeout", ...
    reason: str


class PrefillStatus(msgspec.Struct, kw_only=True, tag_field="kind", tag="prefill"):
    """How loaded a prefill worker is."""

    # Requests queued, not yet running.
    num_waiting: int = 0
    # Requests running (in the prefill forward).
    num_running: int = 0
    # Most requests it runs at once.
    max_running: int = 1
    # Predicted seconds of the prompts queued or running there.
    queued_prefill_s: float = 0.0


class DecodeStatus(msgspec.Struct, kw_only=True, tag_field="kind", tag="decode"):
    """How loaded a decode worker is and how much KV room it has."""

    # Requests queued, not yet running.
    num_waiting: int = 0
    # Requests running in the decode batch.
    num_running: int = 0
    # Most requests it runs at once.
    max_running: int = 1
    # KV bytes free for new requests (free blocks times block size).
    num_free_kv_bytes: int = 0
    # Bytes of all its KV blocks, free or not (no request needing more can ever run there); 0: unknown.
    num_kv_bytes: int = 0
    # Predicted seconds of the next step of the running batch (its current TBT).
    predicted_tbt_s: float = 0.0
    # Tokens of context held by its running batch.
    num_context_tokens: int = 0
    # Per request it holds (waiting or running): (output tokens still to generate, tokens of context it will
    # hold at its end). None from instances that do not report it.
    progress: dict[str, tuple[int, int]] | None = None


class CachestoreStatus(msgspec.Struct, kw_only=True, tag_field="kind", tag="cachestore"):
    """What a cache pool instance contributes to the pool."""

    # True while this instance is the pool's master (clients send their metadata calls there).
    is_pool_master: bool = False
    # Registered buffer id of its DRAM segment.
    kv_buffer_id: int = 0
    # Bytes of DRAM it contributes to the pool.
    num_dram_bytes: int = 0
    # Bytes of SSD it contributes to the pool.
    num_ssd_bytes: int = 0


class ConductorStatus(msgspec.Struct, kw_only=True, tag_field="kind", tag="conductor"):
    """A conductor reports nothing but being alive."""


InstanceStatus = PrefillStatus | DecodeStatus | CachestoreStatus | ConductorStatus


class Heartbeat(Message):
    """Instance -> everyone, every `heartbeat_interval_s`: it is alive, where it listens, and (in `status`,
    tagged by its kind) how loaded it is."""

    # Unique instance name.
    instance_id: str
    # Its kind's own fields; its tag is the instance's kind (which pool it belongs to).
    status: InstanceStatus
    # Served model name ("" for services without a model).
    model: str = ""
    # Its transfer-engine segment name (decode: where prefill writes KV); "" when it has none.
    kv_segment: str = ""
    # "host:port" of its gRPC API (cachestore); "" when it has none.
    grpc_address: str = ""
    # Longest prompt + output the model takes.
    max_model_len: int = 0
    # Wall-clock time of sending.
    sent_at: float = 0.0
    # True on the last heartbeat of an instance shutting down: drop it now.
    is_leaving: bool = False
    # Random id of this process's run: a restarted instance with the same id is a new member to its master.
    boot_id: str = ""
    # Host it runs on (instances on one host reach each other's memory through shared memory).
    host: str = ""
    # Model workers: the cost model fitted from their own measurements (None until measured).
    cost_model: CostModel | None = None
    # Colocated worker (`tsukimi up --colocated`): id of the other half of its process (a prefill names its
    # decode and vice versa); "" for a disaggregated instance.
    colocated_with: str = ""

    @property
    def kind(self) -> InstanceKind:
        """Which pool it belongs to: the tag of its status."""
        return self.status.__struct_config__.tag

    @property
    def is_pool_master(self) -> bool:
        """True when it is a cachestore that is the pool's master."""
        return isinstance(self.status, CachestoreStatus) and self.status.is_pool_master


class BlockStored(msgspec.Struct, tag=True, frozen=True):
    """A replica of a block became readable on one instance's tier."""

    # Chained block key.
    key: bytes
    # Cachestore instance holding the replica.
    instance_id: str
    # "dram" or "ssd".
    tier: str


class BlockRemoved(msgspec.Struct, tag=True, frozen=True):
    """A replica of a block went away (evicted, removed, dropped, its instance lost)."""

    # Chained block key.
    key: bytes
    # Cachestore instance that held the replica.
    instance_id: str
    # "dram" or "ssd".
    tier: str


class PoolEvents(Message):
    """Pool master -> everyone: the replica changes of the pool operations since its previous message, in order.

    `seq` numbers a master's messages without gaps; a consumer that sees a gap, or a new `epoch`, resynchronises
    from a `PoolSnapshot`.
    """

    # Id of the master's run; a new master starts a new stream.
    epoch: str
    # 1, 2, 3, ... within the epoch.
    seq: int
    # What changed, oldest first.
    events: list[BlockStored | BlockRemoved]


class PoolSnapshotRequest(Message):
    """Anyone -> pool master, request/reply: every replica now (answered with a `PoolSnapshot`)."""


class PoolSnapshot(Message):
    """Pool master -> a consumer: the whole index as of `seq` (events up to `seq` are included)."""

    # Id of the master's run.
    epoch: str
    # Last `PoolEvents.seq` the snapshot includes.
    seq: int
    # One entry per replica of every visible block.
    replicas: list[BlockStored]


_encoder = msgspec.msgpack.Encoder()
T = TypeVar("T", bound=msgspec.Struct)


def encode(message: msgspec.Struct) -> bytes:
    """Serialize a message for the bus."""
    return _encoder.encode(message)


def decode(data: bytes, kind: type[T]) -> T:
    """Parse a bus message; raises `msgspec.ValidationError` on a malformed or foreign payload."""
    message = msgspec.msgpack.decode(data, type=kind)
    version = getattr(message, "schema_version", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise msgspec.ValidationError(f"schema version {version} is newer than {SCHEMA_VERSION}")
    return message

"""Process configuration: read from `TSUKIMI_*` environment variables once at start, validated, passed down."""

from __future__ import annotations

import os
import socket

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tsukimi.model.resolve import check_spec

ENV_PREFIX = "TSUKIMI_"


class Settings(BaseSettings):
    """Every knob of every service. Each field maps to the env var `TSUKIMI_<FIELD NAME IN CAPITALS>`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # NATS server every service connects to.
    nats_url: str = "nats://127.0.0.1:4222"
    # "demo" (the built-in seeded model), a known model's name (e.g. "smollm2", pulled into `model_cache_dir`),
    # a local Hugging Face checkpoint directory, or a .gguf file (or a directory holding one), converted once.
    model: str = "demo"
    # Name clients pass as `model`; defaults to "demo" or the checkpoint directory's name.
    served_model_name: str | None = None
    # Directory of converted models (`tsukimi model pull`): one checkpoint directory per known name or GGUF hash.
    model_cache_dir: str = Field("~/.cache/tsukimi/models", validate_default=True)
    # SQLAlchemy URL of the conductor's request journal.
    database_url: str = "sqlite:///tsukimi.db"
    # Unique name of this service instance; generated from host and pid when empty.
    instance_id: str | None = None
    # Address the HTTP servers (gateway API, probes) bind to.
    host: str = "127.0.0.1"
    # Port of the gateway's OpenAI-compatible API.
    gateway_port: int = Field(8000, ge=0, le=65535)
    # Port of a non-gateway service's probe server (/metrics, /health); 0 picks a free port.
    metrics_port: int = Field(0, ge=0, le=65535)
    # Address a worker's transfer engine binds to and advertises to its peers (KV data plane).
    kv_host: str = "127.0.0.1"
    # Port of that transfer engine; 0 picks a free port.
    kv_port: int = Field(0, ge=0, le=65535)
    # Port of the cachestore's gRPC API.
    cachestore_grpc_port: int = Field(50051, ge=0, le=65535)
    # Port of the cachestore's session lane (the Session's messages without gRPC); 0 picks a free port, -1: none.
    cachestore_lane_port: int = Field(0, ge=-1, le=65535)
    # Seconds between two heartbeats of an instance.
    heartbeat_interval_s: float = Field(1.0, gt=0)
    # Seconds without a heartbeat after which an instance is dropped from scheduling.
    instance_ttl_s: float = Field(3.5, gt=0)
    # Seconds the gateway waits for the conductor to place a request (a request may wait for decode room meanwhile).
    submit_timeout_s: float = Field(30.0, gt=0)
    # Seconds the conductor waits for a worker to accept a task.
    dispatch_timeout_s: float = Field(3.0, gt=0)
    # Seconds of silence on a request's token stream after which the gateway fails it.
    stream_timeout_s: float = Field(300.0, gt=0)
    # `max_tokens` used when a chat request gives none (capped by the context left).
    default_max_tokens: int = Field(512, ge=1)
    # Most requests one decode worker runs in its continuous batch.
    max_batch_size: int = Field(32, ge=1)
    # Most prompts waiting in one prefill worker's queue before it refuses more.
    max_prefill_queue: int = Field(256, ge=1)
    # Bytes of the decode worker's KV blocks (shared memory; prefill writes each request's KV into its blocks);
    # 0 or unset: sized from the model, `kv_arena_min_tokens` of its KV capped by `kv_arena_fraction`.
    kv_arena_bytes: int | None = Field(None, ge=0)
    # Decode worker, automatic arena: tokens of KV it holds (16 requests of 2,048 tokens).
    kv_arena_min_tokens: int = Field(16 * 2048, ge=1)
    # Decode worker, automatic arena: most share of the memory available at start (MemAvailable) it takes.
    kv_arena_fraction: float = Field(0.3, gt=0, le=1)
    # Tokens per KV cache block: the unit of prefix reuse (cluster-wide).
    cache_block_tokens: int = Field(64, ge=1)
    # Bytes of DRAM a cachestore instance contributes to the pool.
    cache_dram_bytes: int = Field(256 << 20, ge=1 << 20)
    # Directory of a cachestore instance's SSD tier; empty: no SSD tier.
    cache_ssd_dir: str = ""
    # Bytes of SSD a cachestore instance contributes (with `cache_ssd_dir`).
    cache_ssd_bytes: int = Field(4 << 30, ge=1 << 20)
    # SQLAlchemy URL of the SSD tier's index; empty: SQLite in `cache_ssd_dir`.
    cache_database_url: str = ""
    # Name of the pool the cachestores of one cluster form (one master each).
    cache_pool: str = Field("default", pattern="^[-_a-zA-Z0-9]+$")
    # Whether this cachestore may be the pool's master: "auto" (elected: the first one up holds it, another
    # takes over when it dies), "never" (only contributes memory).
    cache_master: str = Field("auto", pattern="^(auto|never)$")
    # Seconds a put may stay started and not ended before the master revokes it (its writer died or hung), freeing
    # its space and key; longer than a KV transfer may take.
    cache_put_timeout_s: float = Field(60.0, gt=0)
    # Seconds the pool master gathers block events before publishing them as one message (0: one per operation).
    cache_events_coalesce_s: float = Field(0.005, ge=0)
    # Most leases a worker's pool client keeps after reading their blocks, to read them again with no call to the
    # pool master (0: each is given back after its read); a held lease not read under for a second goes back.
    cache_hold_leases: int = Field(1024, ge=0)
    # Bytes of pool DRAM a worker's pool client keeps reserved, per block size (at most 256 blocks' worth), to put
    # blocks with no put start call (0: every put asks the master first); a stock not written to for a second goes
    # back.
    cache_reserve_bytes: int = Field(16 << 20, ge=0)
    # False turns prefix reuse through the pool off (prefill computes every prompt in full).
    is_cache_enabled: bool = True
    # Conductor: placement policy (random, round-robin, least-loaded, local-cache, mooncake; colocated: the
    # vLLM-style baseline, each request on the least loaded colocated prefill+decode pair of one process).
    placement_policy: str = Field(
        "mooncake", pattern="^(random|round-robin|least-loaded|local-cache|mooncake|colocated)$")
    # Prefill worker: prompts longer than this many tokens are computed in chunks of it, and the chunks of the
    # requests in progress take turns (fewest tokens left first); 0: whole prompts, one at a time.
    prefill_chunk_tokens: int = Field(512, ge=0)
    # Prefill worker: requests in progress at once (their chunks share the device's forwards).
    prefill_max_active: int = Field(4, ge=1)
    # Prefill worker: prompts with at most this many tokens left share a forward; a longer one runs alone (its own
    # forward is as efficient, and sharing would add attention across prompts); 0: never share.
    prefill_pack_tokens: int = Field(64, ge=0)
    # Colocated worker: prompt tokens per prefill chunk, interleaved with decode steps; 0: whole prompts.
    chunked_prefill_tokens: int = Field(0, ge=0)
    # Colocated worker: bytes of its own in-process prefix cache (used when `is_cache_enabled`).
    local_prefix_cache_bytes: int = Field(256 << 20, ge=0)
    # Conductor: early rejection (none, early: on the load now, predicted: on the decode load predicted for when
    # the request reaches decode).
    rejection: str = Field("predicted", pattern="^(none|early|predicted)$")
    # SLOs: the conductor rejects what would miss them (HTTP 429), prefill runs the prompt with the least slack to
    # its TTFT deadline first, decode grows its batch while the predicted step stays within the TBT; set them to yours.
    ttft_slo_s: float = Field(30.0, gt=0)
    tbt_slo_s: float = Field(1.0, gt=0)
    # Conductor: a remote cached prefix is worth fetching only when longer than the local one by this many blocks.
    balance_threshold_blocks: int = Field(2, ge=0)
    # Conductor: bytes per second assumed for a KV transfer between hosts.
    transfer_bytes_per_s: float = Field(10e9, gt=0)
    # Shared secret the transfer engines of one cluster authenticate each other with.
    cluster_secret: str = ""
    # Seconds a transfer-engine descriptor lives in the metadata store without a refresh.
    segment_ttl_s: float = Field(10.0, gt=0)
    # Connections a transfer engine opens to one TCP peer.
    transfer_connections: int = Field(4, ge=1)
    # Seconds reserved KV blocks may go without a sign of life from their writer (prefill renews the ones it holds
    # every quarter of it) before decode frees them; longer than a hiccup of the bus.
    kv_orphan_ttl_s: float = Field(40.0, gt=0)
    # Seconds a KV transfer may take before it fails.
    kv_transfer_timeout_s: float = Field(30.0, gt=0)
    # Prefill writes each layer's KV to decode as soon as that layer is computed (False: all after the forward).
    kv_layerwise: bool = True
    # Seconds prefill keeps asking a decode worker whose KV blocks are all in use before failing the request.
    kv_reserve_wait_s: float = Field(10.0, ge=0)
    # Torch intra-op threads per model worker process.
    torch_threads: int = Field(1, ge=1)
    # Conductor: most requests waiting at once for KV room on a decode instance (more are answered 429); 0: none.
    max_decode_wait_requests: int = Field(128, ge=0)
    # Conductor: seconds a request waits for decode KV room before a 429 (cut so that the answer comes before the
    # gateway's `submit_timeout_s`, one `dispatch_timeout_s` and half a second earlier).
    decode_wait_s: float = Field(20.0, ge=0)
    # Most requests the gateway keeps in flight before answering 429.
    max_inflight_requests: int = Field(1024, ge=1)
    # Bytes of the gateway's memory of its chat answers' token ids (UTF-8 text + 4 per id; least recently used out),
    # spliced into a later turn's prompt that sends the answer back so it reuses the answer's KV; 0 turns it off.
    answer_memory_bytes: int = Field(64 << 20, ge=0)
    # Log level of every service.
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"unknown log level {value!r}")
        return value

    @field_validator("kv_arena_bytes")
    @classmethod
    def _arena_size(cls, value: int | None) -> int | None:
        if value and value < 1 << 20:
            raise ValueError(f"kv_arena_bytes must be 0 (automatic) or at least 1 MiB, got {value}")
        return value or None

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        return check_spec(value)

    @field_validator("model_cache_dir")
    @classmethod
    def _absolute_cache_dir(cls, value: str) -> str:
        return os.path.abspath(os.path.expanduser(value))

    def secret_bytes(self) -> bytes:
        """The cluster secret; raises ValueError when none is configured (transfers must authenticate)."""
        if not self.cluster_secret:
            raise ValueError("TSUKIMI_CLUSTER_SECRET is not set: transfer engines need a shared secret")
        return self.cluster_secret.encode()

    def model_name(self) -> str:
        """Name under which the model is served."""
        if self.served_model_name:
            return self.served_model_name
        return "demo" if self.model == "demo" else os.path.basename(self.model.rstrip("/"))

    def instance_name(self, service: str) -> str:
        """This instance's id: the configured one or `<service>-<host>-<pid>`."""
        return self.instance_id or f"{service}-{socket.gethostname()}-{os.getpid()}"

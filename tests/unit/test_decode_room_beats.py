"""What a decode worker tells conductors about its KV room: the whole arena, each request's context at its end
(held + tokens still to generate), and an early heartbeat when sequences leave (no broker: a recording bus)."""

import torch

from tsukimi.common import subjects
from tsukimi.common.messages import Heartbeat, SamplingParams, decode
from tsukimi.common.settings import Settings
from tsukimi.decode.engine import DecodeEngine
from tsukimi.decode.kv_blocks import KVBlocks
from tsukimi.decode.service import DecodeService
from tsukimi.model.kv import block_layout
from tests.unit.tiny_model import TINY
from transformers import LlamaConfig, LlamaForCausalLM


class FakeBus:
    def __init__(self):
        self.published = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append((subject, data))


def tiny_service(num_blocks=32) -> tuple[DecodeService, DecodeEngine, FakeBus]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    engine = DecodeEngine(model, 8, 256, KVBlocks(block_layout(model, 4), num_blocks))
    service = DecodeService(Settings(instance_id="d-test"), engine)
    service.nc = FakeBus()
    return service, engine, service.nc


def kv_of(engine: DecodeEngine, num_tokens: int):
    block = engine.kv.block
    return [(torch.zeros(1, block.num_kv_heads, num_tokens, block.head_dim),
             torch.zeros(1, block.num_kv_heads, num_tokens, block.head_dim)) for _ in range(block.num_layers)]


async def test_heartbeat_reports_the_whole_arena_and_each_request_s_final_context():
    service, engine, _ = tiny_service()
    beat = service.heartbeat(False)
    assert beat.status.num_kv_bytes == 32 * engine.kv.block_bytes == beat.status.num_free_kv_bytes
    sampling = SamplingParams(temperature=0.0, max_tokens=5)
    service._arrived = [engine.sequence_with_kv("a", sampling, kv_of(engine, 10), 1)]
    await service._step()  # one step: 11 tokens held, 2 of 5 output tokens out
    assert service.heartbeat(False).status.progress == {"a": (3, 14)}
    assert service.heartbeat(False).status.num_kv_bytes == 32 * engine.kv.block_bytes


async def test_a_heartbeat_goes_out_at_once_when_a_sequence_leaves():
    service, engine, bus = tiny_service()
    service._arrived = [engine.sequence_with_kv("a", SamplingParams(temperature=0.0, max_tokens=2), kv_of(engine, 10),
                                                1)]
    await service._step()  # its last token: it leaves, its blocks are free
    subject = subjects.heartbeat("decode", "d-test")
    beats = [decode(data, Heartbeat) for s, data in bus.published if s == subject]
    assert len(beats) == 1
    assert beats[0].status.progress == {} and beats[0].status.num_free_kv_bytes == 32 * engine.kv.block_bytes
    service._arrived = [engine.sequence_with_kv("b", SamplingParams(temperature=0.0, max_tokens=3), kv_of(engine, 10),
                                                1)]
    await service._step()  # nobody leaves: no early heartbeat
    assert [s for s, _ in bus.published if s.startswith("tsukimi.v2.heartbeat")] == [subject]

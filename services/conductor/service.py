"""Conductor process: keeps a view of the cluster (instances from heartbeats, cached blocks from the pool's
events), places each request with the KV-cache-aware policy (`placement.py`), rejects early what would miss its
SLO, and hands the rest to a prefill worker. A request that finds no decode instance with room for its KV waits
(`decode_wait.py`), re-tried on each decode heartbeat, until it is placed or its wait ends in a 429.

Several conductors may run: they share the submit subject in a NATS queue group, so each request is placed once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import grpc
import msgspec
from prometheus_client import Counter, Gauge, Histogram

from tsukimi.common import subjects
from tsukimi.common.logs import request_id_var
from tsukimi.kvpool.block_keys import block_keys
from tsukimi.common.messages import (
    CancelRequest, ConductorStatus, ErrorInfo, GenerateRequest, Heartbeat, PoolEvents, PoolSnapshot, PoolSnapshotRequest, PrefillTask,
    SubmitReply, TaskAck, decode, encode,
)
from tsukimi.kvpool.pool_view import PoolView
from tsukimi.common.registry import InstanceRegistry
from tsukimi.common.service_runtime import ServiceRuntime, run_with_probe
from tsukimi.common.settings import Settings
from tsukimi.conductor.cluster import ClusterView
from tsukimi.conductor import refusals
from tsukimi.conductor.decode_wait import MARGIN_S, DecodeWaitQueue, Waiter, wait_budget_s
from tsukimi.conductor.hot_blocks import HotBlocks
from tsukimi.conductor.journal import RequestJournal
from tsukimi.conductor.placement import Decision, PlacementConfig, Placer, Request
from tsukimi.proto import cachestore_pb2 as pb
from tsukimi.proto import cachestore_pb2_grpc as pb_grpc

log = logging.getLogger("tsukimi.conductor")

DECISIONS = Counter("tsukimi_conductor_decisions_total", "Placement decisions by outcome", ["outcome"])
INSTANCES = Gauge("tsukimi_conductor_instances", "Live instances by kind", ["kind"])
REJECTIONS = Counter("tsukimi_conductor_rejections_total", "Requests rejected before prefill, by reason", ["reason"])
REPLICA_CHANGES = Counter("tsukimi_conductor_replica_changes_total", "Blocks whose replica count it changed")
PREDICTED_TTFT = Histogram("tsukimi_conductor_predicted_ttft_seconds", "TTFT predicted at placement",
                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
DECISION_SECONDS = Histogram("tsukimi_conductor_decision_seconds", "Time to place and dispatch a request",
                             buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
WAITING = Gauge("tsukimi_conductor_decode_waiting_requests", "Requests waiting for KV room on a decode instance")
WAITS = Counter("tsukimi_conductor_decode_waits_total", "Requests that found no decode room, by how their wait ended",
                ["outcome"])
WAIT_SECONDS = Histogram("tsukimi_conductor_decode_wait_seconds", "Time requests waited for decode KV room",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))

MAX_PREFILL_ATTEMPTS = 3


@dataclass
class _Submission:
    """A request being placed: the message to answer, and when it came (`time.monotonic`, `time.perf_counter`)."""

    msg: object
    request: GenerateRequest
    received: float
    started: float
    # What placement was asked for it (kept while it waits: its block keys are worked out once).
    wanted: Request | None = None


class ConductorService:
    """The bus-facing side of the conductor."""

    def __init__(self, settings: Settings, journal: RequestJournal):
        self.settings = settings
        self.instance_id = settings.instance_name("conductor")
        # Start-up, heartbeats, cancellations, shutdown.
        self.runtime = ServiceRuntime(self.instance_id)
        self.registry = InstanceRegistry(settings.instance_ttl_s)
        self.pool_view = PoolView()
        self.view = ClusterView(self.pool_view, block_tokens=settings.cache_block_tokens)
        self.placer = Placer(PlacementConfig(
            policy=settings.placement_policy, rejection=settings.rejection, block_tokens=settings.cache_block_tokens,
            balance_threshold_blocks=settings.balance_threshold_blocks,
            transfer_bytes_per_s=settings.transfer_bytes_per_s, ttft_slo_s=settings.ttft_slo_s,
            tbt_slo_s=settings.tbt_slo_s))
        self._resync: asyncio.Task | None = None
        self.hot = HotBlocks()
        # gRPC address of the cache pool master (from its heartbeat), and a channel to it.
        self._master_address = ""
        self._master_channel = None
        self._replicating: asyncio.Task | None = None
        self.journal = journal
        # NOTE: one writer thread keeps journal writes ordered and off the event loop.
        self._journal_writer = ThreadPoolExecutor(1, thread_name_prefix="journal")
        wait_s = wait_budget_s(settings.decode_wait_s, settings.submit_timeout_s, settings.dispatch_timeout_s)
        if wait_s < settings.decode_wait_s:
            log.warning("decode_wait_s %gs cut to %gs: the wait and one dispatch (%gs) must end before the gateway's "
                        "submit_timeout_s (%gs)", settings.decode_wait_s, wait_s, settings.dispatch_timeout_s,
                        settings.submit_timeout_s)
        # Requests waiting for decode room, and the signal that a decode heartbeat came while some wait.
        self.waiting: DecodeWaitQueue[_Submission] = DecodeWaitQueue(settings.max_decode_wait_requests, wait_s)
        self._room = asyncio.Event()
        self.nc = None

    async def _on_heartbeat(self, msg) -> None:
        try:
            beat = decode(msg.data, Heartbeat)
        except msgspec.ValidationError:
            return
        if beat.kind not in ("prefill", "decode", "cachestore"):
            return
        if beat.is_leaving:
            self.registry.remove(beat.instance_id)
            self.view.forget(beat.instance_id)
            log.info("%s %s left", beat.kind, beat.instance_id)
            return
        if self.registry.observe(beat, time.monotonic()):
            log.info("%s %s joined (model %s)", beat.kind, beat.instance_id, beat.model)
        self.view.observe(beat, time.monotonic())
        if beat.kind == "decode" and len(self.waiting):
            self._room.set()
        if beat.kind == "cachestore" and beat.is_pool_master:
            self._master_address = beat.grpc_address

    async def _on_pool_events(self, msg) -> None:
        try:
            events = decode(msg.data, PoolEvents)
        except msgspec.ValidationError:
            return
        if not self.pool_view.apply(events) and (self._resync is None or self._resync.done()):
            self._resync = asyncio.create_task(self._resynchronise())

    async def _resynchronise(self) -> None:
        """Loads the pool master's snapshot (after missed events or a new master)."""
        try:
            reply = await self.nc.request(subjects.POOL_SNAPSHOT, encode(PoolSnapshotRequest()), timeout=2.0)
            self.pool_view.load(decode(reply.data, PoolSnapshot))
            log.info("cache index resynchronised: %d blocks (epoch %s, seq %d)", self.pool_view.num_blocks,
                     self.pool_view.epoch[:8], self.pool_view.seq)
        except Exception as exc:  # NOTE: no master yet, or it is busy: the next event retries.
            log.info("cache index resync failed: %s", exc)

    async def _on_submit(self, msg) -> None:
        started = time.perf_counter()
        try:
            request = decode(msg.data, GenerateRequest)
        except msgspec.ValidationError as exc:
            await msg.respond(encode(SubmitReply(is_accepted=False, error=ErrorInfo(
                message=f"malformed request: {exc}", type="invalid_request_error", http_status=400))))
            return
        token = request_id_var.set(request.request_id)
        try:
            sub = _Submission(msg, request, time.monotonic(), started)
            reply = await self._place(request, sub)
            if reply is not None:
                await self._answer(sub, reply)
        finally:
            request_id_var.reset(token)

    async def _place(self, request: GenerateRequest, sub: _Submission | None = None) -> SubmitReply | None:
        """The reply to `request`: placed and dispatched, or refused; None when it waits for decode room (`sub`,
        the message to answer later, given)."""
        if sub is None:
            sub = _Submission(None, request, time.monotonic(), time.perf_counter())
        wanted, decision = self.decide(request, sub.received)
        sub.wanted = wanted
        if decision.rejected == "decode_full" and sub.msg is not None and self._wait(sub):
            return None
        return await self._settle(sub, wanted, decision)

    async def _answer(self, sub: _Submission, reply: SubmitReply) -> None:
        await sub.msg.respond(encode(reply))
        DECISION_SECONDS.observe(time.perf_counter() - sub.started)
        status = "placed" if reply.is_accepted else "refused"
        DECISIONS.labels(status if reply.is_accepted else (reply.error.code or "refused")).inc()
        asyncio.get_running_loop().run_in_executor(
            self._journal_writer, self._record, sub.request, status, reply)

    def _record(self, request: GenerateRequest, status: str, reply: SubmitReply) -> None:
        try:
            self.journal.record(request.request_id, request.model, len(request.prompt_token_ids), status,
                                request.arrival_time, reply.prefill_id, reply.decode_id,
                                reply.error.code if reply.error else None)
        except Exception as exc:  # NOTE: the journal is an audit trail; a failed write must not fail requests.
            log.warning("journal write failed for %s: %s", request.request_id, exc)

    def decide(self, request: GenerateRequest, now: float) -> tuple[Request, Decision]:
        """The placement decision for a request (pure given the current view)."""
        keys = block_keys(request.prompt_token_ids, self.settings.cache_block_tokens, request.model)
        wanted = Request(request.request_id, len(request.prompt_token_ids), request.sampling.max_tokens, tuple(keys))
        return wanted, self._decide(request.model, wanted, now)

    def _decide(self, model: str, wanted: Request, now: float) -> Decision:
        prefills, decodes = self.view.serving(model)
        holdings = self.view.holdings(list(wanted.block_keys), prefills)
        return self.placer.place(wanted, now, prefills, decodes, holdings)

    async def _settle(self, sub: _Submission, wanted: Request, decision: Decision) -> SubmitReply:
        """The refusal of a rejected decision, or the reply of its dispatch."""
        if decision.is_rejected:
            REJECTIONS.labels(decision.rejected).inc()
            prefills, decodes = self.view.serving(sub.request.model)
            error = refusals.refusal(sub.request, decision, self.settings.ttft_slo_s, self.settings.tbt_slo_s,
                                     bool(prefills), decodes, len(self.waiting) if self.waiting.wait_s > 0 else None)
            log.warning("refused (%s): %s", decision.rejected, error.message)
            return SubmitReply(is_accepted=False, error=error)
        return await self._dispatch(sub, wanted, decision)

    async def _dispatch(self, sub: _Submission, wanted: Request, decision: Decision) -> SubmitReply:
        """Hands the placed request to its prefill instance (then the alternates), before the gateway gives up."""
        now = time.monotonic()
        request = sub.request
        PREDICTED_TTFT.observe(decision.predicted_ttft_s)
        decode_id = decision.decode_id
        task = PrefillTask(request=request, decode_id=decode_id,
                           decode_segment=self.registry.get(decode_id).kv_segment)
        # NOTE: booked before the dispatch, so that what is placed meanwhile (the waiters beside new submissions)
        # sees the room taken; given back when no prefill instance takes it.
        is_booked = decision.prefill_id in self.view.prefills and decode_id in self.view.decodes
        if is_booked:
            self.placer.commit(wanted, decision, now, self.view.prefills, self.view.decodes)
        deadline = sub.received + self.settings.submit_timeout_s - MARGIN_S
        last_error = ErrorInfo(message="no prefill instance took the request in time", type="service_unavailable",
                               code="no_capacity", http_status=503)
        for prefill_id in [decision.prefill_id, *decision.alternates][:MAX_PREFILL_ATTEMPTS]:
            timeout_s = min(self.settings.dispatch_timeout_s, deadline - time.monotonic())
            if timeout_s <= 0:
                break
            try:
                reply = await self.nc.request(subjects.prefill_tasks(prefill_id), encode(task), timeout=timeout_s)
                ack = decode(reply.data, TaskAck)
            except Exception as exc:
                log.warning("prefill %s did not take the task (%r); dropping it from scheduling", prefill_id, exc)
                self.registry.remove(prefill_id)
                self.view.forget(prefill_id)
                last_error = ErrorInfo(message=f"prefill {prefill_id} unreachable", type="service_unavailable",
                                       code="no_capacity", http_status=503)
                continue
            if ack.is_accepted:
                if is_booked and prefill_id != decision.prefill_id and prefill_id in self.view.prefills:
                    self.view.prefills[prefill_id].enqueue(now, decision.predicted_transfer_s
                                                           + decision.predicted_prefill_s)
                decision.prefill_id = prefill_id
                self.hot.observe(list(wanted.block_keys), now)
                log.info("placed on prefill %s (reusing %d blocks), decode %s; predicted TTFT %.3fs, TBT %.1fms",
                         prefill_id, decision.num_reused_blocks, decode_id, decision.predicted_ttft_s,
                         decision.predicted_tbt_s * 1000)
                return SubmitReply(is_accepted=True, prefill_id=prefill_id, decode_id=decode_id)
            last_error = ack.error or last_error
            if ack.error and 400 <= ack.error.http_status < 500:
                break
        if is_booked and decode_id in self.view.decodes:
            self.view.decodes[decode_id].finish(request.request_id)
        return SubmitReply(is_accepted=False, error=last_error)

    # ---- waiting for decode room -------------------------------------------------------------------------

    def _wait(self, sub: _Submission) -> bool:
        """Queues a request that found no decode room; False when the queue is full (or waiting is off)."""
        if not self.waiting.push(sub.request.request_id, sub, sub.received):
            if self.waiting.wait_s > 0:
                WAITS.labels("full").inc()
            return False
        WAITING.set(len(self.waiting))
        log.info("no decode instance has room for its KV: waiting up to %gs (%d waiting)", self.waiting.wait_s,
                 len(self.waiting))
        self._room.set()
        return True

    async def _serve_waiters(self, stop: asyncio.Event) -> None:
        """Re-tries the waiting requests in arrival order after each decode heartbeat; answers 429 to those whose
        wait is over; on shutdown, 503 to those left."""
        while not stop.is_set():
            deadline = self.waiting.next_deadline()
            timeout_s = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(self._room.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
            self._room.clear()
            for key, waiter in self.waiting.expire(time.monotonic()):
                _, decodes = self.view.serving(waiter.item.request.model)
                error = refusals.wait_over(self.waiting.wait_s, decodes, time.monotonic())
                await self._end_wait(key, waiter, "timed_out", SubmitReply(is_accepted=False, error=error))
            for key, waiter in self.waiting.waiting():
                now = time.monotonic()
                wanted = replace(waiter.item.wanted, waited_s=now - waiter.since)
                decision = self._decide(waiter.item.request.model, wanted, now)
                if decision.rejected == "decode_full" or self.waiting.remove(key) is None:
                    continue
                token = request_id_var.set(key)
                try:
                    reply = await self._settle(waiter.item, wanted, decision)
                finally:
                    request_id_var.reset(token)
                await self._end_wait(key, waiter, "placed" if reply.is_accepted else "refused", reply)
        for key, waiter in self.waiting.drain():
            reply = SubmitReply(is_accepted=False, error=refusals.shutting_down())
            await self._end_wait(key, waiter, "shutdown", reply)

    async def _end_wait(self, key: str, waiter: Waiter[_Submission], outcome: str, reply: SubmitReply) -> None:
        WAITS.labels(outcome).inc()
        WAIT_SECONDS.observe(time.monotonic() - waiter.since)
        WAITING.set(len(self.waiting))
        token = request_id_var.set(key)
        try:
            if outcome != "placed":
                log.warning("wait for decode room over (%s): %s", outcome, reply.error.message if reply.error else "")
            await self._answer(waiter.item, reply)
        except Exception as exc:  # NOTE: the gateway may be gone; the other waiters still get their answers.
            log.warning("could not answer %s: %r", key, exc)
        finally:
            request_id_var.reset(token)

    async def _on_cancel(self, cancel: CancelRequest) -> None:
        waiter = self.waiting.remove(cancel.request_id)
        if waiter is not None:
            reply = SubmitReply(is_accepted=False, error=refusals.cancelled(cancel.reason))
            await self._end_wait(cancel.request_id, waiter, "cancelled", reply)

    async def _balance_replicas(self) -> None:
        """Cache load balancing: asks the pool master to hold hot blocks in more cachestores' DRAM (and cold ones
        in one again), as their demand in `hot` says."""
        num_stores = len(self.registry.alive("cachestore", time.monotonic()))
        targets = self.hot.targets(time.monotonic(), max(1, num_stores))
        changes = []
        for key, wanted in targets.items():
            holders = self.pool_view.holders(key)
            num_dram = sum(1 for _, tier in holders if tier == "dram")
            if holders and num_dram != wanted:
                changes.append((key, wanted))
        if not changes or not self._master_address:
            return
        if self._master_channel is None or self._master_channel[0] != self._master_address:
            if self._master_channel is not None:
                await self._master_channel[1].close()
            self._master_channel = (self._master_address, grpc.aio.insecure_channel(self._master_address))
        stub = pb_grpc.CacheStoreStub(self._master_channel[1])
        try:
            await stub.BatchChangeReplicas(pb.BatchChangeReplicasRequest(changes=[
                pb.ChangeReplicasRequest(key=key, num_replicas=n) for key, n in changes]), timeout=5)
            REPLICA_CHANGES.inc(len(changes))
            log.info("asked the pool for new replica counts of %d hot or cooled blocks", len(changes))
        except grpc.aio.AioRpcError as exc:
            log.info("replica change refused: %s", exc.code().name)

    def heartbeat(self, is_leaving: bool) -> Heartbeat:
        return Heartbeat(instance_id=self.instance_id, status=ConductorStatus(), sent_at=time.time(),
                         is_leaving=is_leaving)

    async def run(self, stop: asyncio.Event) -> None:
        self.nc = await self.runtime.connect(self.settings.nats_url)
        await self.nc.subscribe(subjects.HEARTBEAT_ALL, cb=self._on_heartbeat)
        await self.nc.subscribe(subjects.SUBMIT, queue=subjects.CONDUCTOR_QUEUE, cb=self._on_submit)
        await self.nc.subscribe(subjects.POOL_EVENTS, cb=self._on_pool_events)
        await self.runtime.follow_cancels(self._on_cancel)
        self._resync = asyncio.create_task(self._resynchronise())
        self.runtime.beat("conductor", self.heartbeat, self.settings.heartbeat_interval_s, stop)
        self.runtime.loop(self._serve_waiters(stop))
        self.runtime.on_close(self._close_master_channel)
        log.info("conductor %s ready", self.instance_id)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            for iid in self.registry.expire(time.monotonic()):
                self.view.forget(iid)
                log.warning("instance %s stopped heartbeating; dropped from scheduling", iid)
            if self._replicating is None or self._replicating.done():
                self._replicating = asyncio.create_task(self._balance_replicas())
            for kind in ("prefill", "decode"):
                INSTANCES.labels(kind).set(len(self.registry.alive(kind, time.monotonic())))
        await self.runtime.shutdown()
        self._journal_writer.shutdown(wait=True)

    async def _close_master_channel(self) -> None:
        if self._master_channel is not None:
            await self._master_channel[1].close()


def main(settings: Settings) -> None:
    """Runs one conductor until SIGINT/SIGTERM."""
    journal = RequestJournal(settings.database_url)
    service = ConductorService(settings, journal)

    def health() -> tuple[bool, dict]:
        return service.nc is not None and service.nc.is_connected, {"instance_id": service.instance_id}

    try:
        run_with_probe("conductor", settings.host, settings.metrics_port, service.run, health)
    finally:
        journal.close()

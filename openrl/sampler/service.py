"""The sampler process: competing consumers of one base model's sample queue.

Every sampler of a base model pulls from the same durable consumer on the `OPENRL_SAMPLE`
work queue, so N processes share the load and a request that a dead sampler held is
redelivered to another one (or to the restarted one) after `ack_wait`; while a request
is being generated its message is kept alive with in-progress acks.

Requests are batched: each message's handler validates its request and puts it on a
queue; one batcher drains what is waiting (up to `max_batch`), runs it as one batch on
the compute thread (base model and any number of adapters mixed) and hands each result
back to its handler, which stores the future and acks.

Adapters are versioned by the model and seq_id they were saved at (`adapters/<model>/
seq-<n>` in the object store), so "the weights as of that point in the model's sequence"
is a lookup, never a race. Fetched adapters are cached as bytes (bounded LRU) and loaded
into the backend on demand.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import structlog
from nats.js.errors import NotFoundError, ObjectNotFoundError

from openrl.bus import subjects
from openrl.bus.client import Bus
from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import LORA_ALPHA, Future, SampleRequest, SampleResult, SampledSequence, Tensor, TopK, WorkerInfo, encode
from openrl.sampler import backend as be

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SamplerConfig:
    base_model: str
    model_path: str
    nats_url: str = "nats://127.0.0.1:4222"
    worker_id: str = ""
    default_max_tokens: int = 256
    max_batch: int = 64  # requests per batch
    # After the first request, keep collecting while more keep arriving (each within
    # `batch_gap_s` of the last), for at most `batch_wait_s`: a burst of requests from a
    # client's loop becomes one batch instead of a small one and a late big one.
    batch_gap_s: float = 0.02
    batch_wait_s: float = 0.15
    cached_adapters: int = 32  # adapter blobs kept in memory
    heartbeat_s: float = 2.0
    ack_wait_s: float = 10.0  # a dead sampler's requests go to another after this; in-progress acks keep live ones


@dataclass
class _Job:
    msg: SampleRequest
    spec: be.SampleSpec
    done: asyncio.Future
    queued: float = dataclasses.field(default_factory=time.perf_counter)


class Sampler:
    def __init__(self, cfg: SamplerConfig, bus: Bus, backend: be.TransformersSampler):
        self.cfg = cfg
        self.bus = bus
        self.backend = backend
        self.worker_id = cfg.worker_id or f"sampler-{socket.gethostname()}-{os.getpid()}"
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._fetching: dict[str, asyncio.Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sample")
        self._busy_s = 0.0
        self._started = time.time()
        self.served = 0

    # -- requests

    def spec(self, msg: SampleRequest) -> be.SampleSpec:
        target = None
        if msg.target_prompt_logprobs is not None:
            target = _dense_int64(msg.target_prompt_logprobs, pad=-1)
        return be.SampleSpec(
            prompt=np.frombuffer(msg.prompt, dtype="<i4").tolist(),
            num_samples=msg.num_samples,
            max_tokens=msg.max_tokens or self.cfg.default_max_tokens,
            temperature=msg.temperature,
            top_k=msg.top_k,
            top_p=msg.top_p,
            seed=msg.seed,
            stop_strings=list(msg.stop_strings),
            stop_token_ids=list(msg.stop_token_ids),
            stop_at_eos=msg.stop_at_eos,
            prompt_logprobs=msg.prompt_logprobs,
            prompt_logprobs_last_n=msg.prompt_logprobs_last_n,
            topk_prompt_logprobs=msg.topk_prompt_logprobs,
            topk_sample_logprobs=msg.topk_sample_logprobs,
            target_prompt_logprobs=target,
            prompt_alt_tokens_k=msg.prompt_alt_tokens_k,
            adapter=msg.weights,
        )

    async def on_sample(self, msg: SampleRequest) -> None:
        base = dict(request_id=msg.request_id, owner="", request_type="Sample")
        stored = await self.bus.kv_get(self.bus.futures, msg.request_id, Future)
        if stored is None or stored.state != "pending":
            return  # done before (a redelivery after the result was stored), or expired
        base["owner"] = stored.owner
        try:
            spec = self.spec(msg)
            # Content checks now; the adapter is loaded right before its batch runs.
            self.backend.validate(dataclasses.replace(spec, adapter=None))
            if msg.weights is not None:
                await self._blob(msg.weights)  # fetch now, so the batch never waits on the network
            job = _Job(msg=msg, spec=spec, done=asyncio.get_running_loop().create_future())
            await self._queue.put(job)
            result = await job.done
            if isinstance(result, InvalidRequest):
                raise result
            fut = Future(state="done", content_type="sample", payload=encode(to_bus(result, msg.target_prompt_logprobs)), finished_at=time.time(), **base)
            self.served += 1
        except InvalidRequest as e:
            fut = Future(state="failed", error=str(e), category="user", finished_at=time.time(), **base)
        await self.bus.finish_future(fut)

    async def _blob(self, name: str) -> bytes:
        blob = self._blobs.get(name)
        if blob is not None:
            self._blobs.move_to_end(name)
            return blob
        pending = self._fetching.get(name)
        if pending is None:
            pending = self._fetching[name] = asyncio.ensure_future(self._fetch(name))
            pending.add_done_callback(lambda _: self._fetching.pop(name, None))
        return await asyncio.shield(pending)

    async def _fetch(self, name: str) -> bytes:
        try:
            result = await self.bus.objects.get(name)
        except (ObjectNotFoundError, NotFoundError):
            raise InvalidRequest(f"the weights of this sampling session ({name}) are not available") from None
        self._blobs[name] = result.data
        while len(self._blobs) > self.cfg.cached_adapters:
            self._blobs.popitem(last=False)
        log.info("adapter_fetched", object=name, bytes=len(result.data))
        return result.data

    # -- the batcher

    async def batcher(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                first = await asyncio.wait_for(self._queue.get(), 0.5)
            except asyncio.TimeoutError:
                continue
            jobs = [first]
            deadline = time.monotonic() + self.cfg.batch_wait_s
            while len(jobs) < self.cfg.max_batch:
                wait = min(self.cfg.batch_gap_s, deadline - time.monotonic())
                try:
                    jobs.append(self._queue.get_nowait() if wait <= 0 else await asyncio.wait_for(self._queue.get(), wait))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            await self._run_batch(jobs)

    async def _run_batch(self, jobs: list[_Job]) -> None:
        # Adapter blobs are in memory (fetched by the handlers); load the missing ones here,
        # right before the batch, so an LRU eviction in the backend can never strand a job.
        blobs = {}
        for job in jobs:
            key = job.spec.adapter
            if key is not None and key not in blobs:
                try:
                    blobs[key] = await self._blob(key)
                except InvalidRequest as e:
                    blobs[key] = e
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._pool, self._compute, jobs, blobs)
        except Exception as e:  # a bug or an OOM: fail these requests, keep serving
            log.exception("sample_batch_failed", size=len(jobs))
            results = [InvalidRequest(f"sampler error: {e!r}")] * len(jobs)
        finally:
            self._busy_s += time.perf_counter() - started
        log.debug("batch_ran", requests=len(jobs), rows=sum(j.spec.num_samples for j in jobs), seconds=round(time.perf_counter() - started, 3),
                  waited_ms=round((started - min(j.queued for j in jobs)) * 1000, 1))  # fmt: skip
        for job, result in zip(jobs, results):
            if not job.done.done():
                job.done.set_result(result)

    def _compute(self, jobs: list[_Job], blobs: dict) -> list:
        from safetensors.torch import load

        out: list = [None] * len(jobs)
        runnable = []
        for i, job in enumerate(jobs):
            key = job.spec.adapter
            if key is not None and not self.backend.has_adapter(key):
                blob = blobs.get(key)
                if isinstance(blob, InvalidRequest) or blob is None:
                    out[i] = blob or InvalidRequest(f"adapter {key} is not available")
                    continue
                state = load(blob)
                lora = job.msg.lora
                targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in state})
                self.backend.load_adapter(key, state, rank=lora.rank if lora else _rank(state), alpha=LORA_ALPHA, target_modules=targets)
            runnable.append(i)
        results = self.backend.sample([jobs[i].spec for i in runnable]) if runnable else []
        for i, result in zip(runnable, results):
            out[i] = result
        return out

    # -- the process

    def info(self) -> WorkerInfo:
        now = time.time()
        b = self.backend.info
        return WorkerInfo(
            worker_id=self.worker_id,
            kind="sampler",
            host=socket.gethostname(),
            pid=os.getpid(),
            base_model=self.cfg.base_model,
            model_name=self.cfg.base_model,
            tokenizer_id=self.cfg.base_model,
            vocab_size=b.vocab_size,
            max_context=b.max_context,
            device=b.device,
            started_at=self._started,
            heartbeat_at=now,
            busy_fraction=min(1.0, self._busy_s / max(now - self._started, 1e-9)),
            models=len(self._blobs),
        )

    async def heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.bus.kv_put(self.bus.workers, self.worker_id, self.info())
            except Exception as e:  # reconnecting: try again next tick
                log.warning("heartbeat_failed", error=repr(e))
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.heartbeat_s)
            except asyncio.TimeoutError:
                pass
        try:
            await self.bus.workers.delete(subjects.kv_key(self.worker_id))
        except Exception:
            pass

    async def run(self, stop: asyncio.Event) -> None:
        log.info("sampler_ready", worker_id=self.worker_id, base_model=self.cfg.base_model, device=self.backend.info.device)
        try:
            await asyncio.gather(
                self.heartbeat(stop),
                self.batcher(stop),
                self.bus.consume(
                    stream=subjects.SAMPLE_STREAM,
                    durable=subjects.sampler_consumer(self.cfg.base_model),
                    filter_subject=subjects.sample(self.cfg.base_model),
                    type_=SampleRequest,
                    handle=self.on_sample,
                    ack_wait_s=self.cfg.ack_wait_s,
                    max_inflight=4 * self.cfg.max_batch,
                    batch=self.cfg.max_batch,
                    stop=stop,
                ),
            )
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _rank(state: dict) -> int:
    return next(v.shape[0] for k, v in state.items() if "lora_A" in k)


def _dense_int64(t: Tensor, pad: int) -> np.ndarray:
    """A request tensor (dense or CSR) as a dense int64 array; unlisted CSR cells get `pad`."""
    values = np.frombuffer(t.data, dtype="<i8")
    if t.crow is None:
        shape = t.shape or [len(values)]
        if int(np.prod(shape)) != len(values):
            raise InvalidRequest(f"target_prompt_logprobs: shape {shape} does not match {len(values)} values")
        return values.reshape(shape).copy()
    if len(t.shape) != 2:
        raise InvalidRequest("target_prompt_logprobs: CSR needs a 2-D shape")
    rows, cols = t.shape
    crow = np.frombuffer(t.crow, dtype="<i8")
    col = np.frombuffer(t.col or b"", dtype="<i8")
    if len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != len(col) or len(col) != len(values) or (np.diff(crow) < 0).any() or (len(col) and (col.min() < 0 or col.max() >= cols)):
        raise InvalidRequest("target_prompt_logprobs: malformed CSR indices")
    dense = np.full((rows, cols), pad, dtype=np.int64)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense


def to_bus(result: be.SampleResult, request: Tensor | None = None) -> SampleResult:
    """The backend's numpy result as the bus message (packed little-endian bytes).
    `request` is the asked target_prompt_logprobs: a sparse ask gets a sparse answer."""

    def topk(tokens, logprobs) -> TopK | None:
        if tokens is None:
            return None
        return TopK(k=int(tokens.shape[1]), tokens=tokens.astype("<i8").tobytes(), logprobs=logprobs.astype("<f4").tobytes())

    target = None
    if result.target_prompt_logprobs is not None:
        dense = result.target_prompt_logprobs.astype("<f4")
        if request is not None and request.crow is not None:
            crow = np.frombuffer(request.crow, dtype="<i8")
            col = np.frombuffer(request.col or b"", dtype="<i8")
            values = dense[np.repeat(np.arange(len(crow) - 1), np.diff(crow)), col]
            target = Tensor(dtype="float32", data=values.tobytes(), shape=list(dense.shape), crow=request.crow, col=request.col)
        else:
            target = Tensor(dtype="float32", data=dense.tobytes(), shape=list(dense.shape))
    return SampleResult(
        sequences=[
            SampledSequence(
                tokens=seq.tokens.astype("<i4").tobytes(),
                logprobs=seq.logprobs.astype("<f4").tobytes(),
                stop_reason=seq.stop_reason,
                topk=topk(seq.topk_tokens, seq.topk_logprobs),
            )
            for seq in result.sequences
        ],
        prompt_logprobs=None if result.prompt_logprobs is None else result.prompt_logprobs.astype("<f4").tobytes(),
        topk_prompt=topk(result.topk_prompt_tokens, result.topk_prompt_logprobs),
        target_prompt_logprobs=target,
        prompt_alt=topk(result.prompt_alt_tokens, result.prompt_alt_logprobs),
    )

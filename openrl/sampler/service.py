"""The sampler process: competing consumers of one base model's sample queue.

Every sampler of a base model pulls from the same durable consumer on the `OPENRL_SAMPLE`
work queue, so N processes share the load and a request that a dead sampler held is
redelivered to another one (or to the restarted one) after `ack_wait`; while a request
is being generated its message is kept alive with in-progress acks.

Requests are batched continuously: each message's handler validates its request, fetches
its adapter's weights and puts it on a queue; one loop on the compute thread admits what
is queued (up to `max_batch` requests active) into the running decode between steps (base
model and any number of adapters mixed in every forward, `backend.Scheduler`), and hands
each request's result back to its handler as soon as it finishes; the handler stores the
future and acks. A request never waits for a batch it missed to finish.

Adapters are versioned by the model and seq_id they were saved at (`adapters/<model>/
seq-<n>` in the object store), so "the weights as of that point in the model's sequence"
is a lookup, never a race. Fetched adapters are cached as bytes (bounded LRU) and loaded
into the backend on demand.

The backend is the transformers one (above: a compute thread and `backend.Scheduler`) or an
`AsyncBackend`, which batches the requests in flight on its own (vLLM's engine,
`vllm_backend.VllmSampler`): each handler then awaits its request on the event loop, and
there is no compute thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import structlog
from nats.js.errors import NotFoundError, ObjectNotFoundError

from openrl import metrics
from openrl.bus import subjects
from openrl.bus.client import Bus
from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import LORA_ALPHA, Future, SampleRequest, SampleResult, SampledSequence, Tensor, TopK, UsageRecord, WorkerInfo, encode
from openrl.sampler import backend as be

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SamplerConfig:
    base_model: str
    model_path: str
    nats_url: str = "nats://127.0.0.1:4222"
    worker_id: str = ""
    default_max_tokens: int = 256
    max_batch: int = 64  # requests generating at once; more wait in the queue
    idle_wait_s: float = 0.25  # the compute loop checks for shutdown this often when idle
    cached_adapters: int = 32  # adapter blobs kept in memory
    heartbeat_s: float = 2.0
    ack_wait_s: float = 10.0  # a dead sampler's requests go to another after this; in-progress acks keep live ones


@dataclass
class _Job:
    msg: SampleRequest
    spec: be.SampleSpec
    done: asyncio.Future
    loop: asyncio.AbstractEventLoop
    blob: bytes | None = None  # the adapter's weights (fetched by the handler), None for the base model
    queued: float = dataclasses.field(default_factory=time.perf_counter)

    def resolve(self, result) -> None:
        """From the compute thread: hand the result to the waiting handler."""
        try:
            self.loop.call_soon_threadsafe(_set_result, self.done, result)
        except RuntimeError:  # the event loop is closed: shutting down, nobody is waiting
            pass


def _set_result(done: asyncio.Future, result) -> None:
    if not done.done():
        done.set_result(result)


class AsyncBackend(Protocol):
    """A backend that batches the requests in flight itself, on the event loop (vLLM's engine)."""

    info: be.SamplerInfo

    def validate(self, spec: be.SampleSpec) -> None:
        """Raise InvalidRequest naming the bad field. No compute."""

    async def sample(self, spec: be.SampleSpec, blob: bytes | None) -> be.SampleResult:
        """The request's result (its adapter loaded from `blob` if needed); InvalidRequest: a user error."""

    @property
    def dead(self) -> bool:
        """The engine has failed for good: the process should exit (and be restarted)."""


class Sampler:
    def __init__(self, cfg: SamplerConfig, bus: Bus, backend: be.TransformersSampler | AsyncBackend):
        self.cfg = cfg
        self.bus = bus
        self.backend = backend
        self._threaded = isinstance(backend, be.TransformersSampler)  # else it batches on the event loop
        self._inflight = 0  # requests an AsyncBackend is generating
        self._busy_from = 0.0
        self.worker_id = cfg.worker_id or f"sampler-{socket.gethostname()}-{os.getpid()}"
        self._jobs: queue.Queue[_Job] = queue.Queue()  # handlers -> the compute loop
        self._halt = threading.Event()
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
        pending = await self.bus.pending_future(msg.request_id)
        if pending is None:
            return  # done before (a redelivery after the result was stored), or expired
        stored, revision = pending
        base["owner"] = stored.owner
        usage = None
        started = time.perf_counter()
        try:
            spec = self.spec(msg)
            # Content checks now; the adapter is loaded right before the request joins the decode.
            self.backend.validate(dataclasses.replace(spec, adapter=None))
            # Fetch the weights now, so the compute loop never waits on the network.
            blob = await self._blob(msg.weights) if msg.weights is not None else None
            if self._threaded:
                loop = asyncio.get_running_loop()
                job = _Job(msg=msg, spec=spec, done=loop.create_future(), loop=loop, blob=blob)
                self._jobs.put(job)
                result = await job.done
                if isinstance(result, InvalidRequest):
                    raise result
            else:
                result = await self._sample_async(spec, blob)
            fut = Future(state="done", content_type="sample", payload=encode(to_bus(result, msg.target_prompt_logprobs)), finished_at=time.time(), **base)
            self.served += 1
            metrics.SAMPLED_TOKENS.inc(sum(len(seq.tokens) for seq in result.sequences))
            usage = (len(msg.prompt) // 4, sum(len(seq.tokens) for seq in result.sequences), time.perf_counter() - started)
        except InvalidRequest as e:
            fut = Future(state="failed", error=str(e), category="user", finished_at=time.time(), **base)
        # The result first (one compare-and-set on the revision read above), accounting after.
        if not await self.bus.finish_pending(fut, revision):
            log.info("sample_already_recorded", request_id=msg.request_id)
        elif usage is not None:
            await self._usage(msg, stored.owner, *usage)

    async def _usage(self, msg: SampleRequest, owner: str, prompt_tokens: int, sampled_tokens: int, seconds: float) -> None:
        """Billing usage: prompt and sampled tokens and the wall time (read back deduplicated by request id)."""
        async def one(kind: str, tokens: int) -> None:
            rec = UsageRecord(at=time.time(), owner=owner, kind=kind, tokens=tokens, seconds=seconds if kind == "sampling_sample" else 0.0,
                              base_model=msg.base_model, session_id=msg.sampler_id.split(":sample:")[0], model_id=msg.sampler_id,
                              request_id=msg.request_id)  # fmt: skip
            try:
                await self.bus.publish(subjects.usage(owner), rec, msg_id=f"usage-{kind}-{msg.request_id}")
            except Exception as e:  # a result already computed is never failed over its accounting
                log.warning("usage_record_failed", request_id=msg.request_id, error=repr(e))

        await asyncio.gather(one("sampling_prefill", prompt_tokens), one("sampling_sample", sampled_tokens))

    async def _sample_async(self, spec: be.SampleSpec, blob: bytes | None) -> be.SampleResult:
        """An AsyncBackend's request; the time with any in flight counts as busy."""
        if self._inflight == 0:
            self._busy_from = time.perf_counter()
        self._inflight += 1
        try:
            return await self.backend.sample(spec, blob)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._busy_s += time.perf_counter() - self._busy_from

    async def _blob(self, name: str) -> bytes:
        blob = self._blobs.get(name)
        metrics.ADAPTER_CACHE.inc(result="miss" if blob is None else "hit")
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

    # -- the compute loop

    async def serve(self, stop: asyncio.Event) -> None:
        """Run the compute loop on the compute thread until `stop` (an AsyncBackend: watch it)."""
        if not self._threaded:
            return await self._watch(stop)
        loop = asyncio.get_running_loop()
        self._halt.clear()
        worker = loop.run_in_executor(self._pool, self._serve_loop)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([worker, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._halt.set()
            stopping.cancel()
        if worker.done():
            worker.result()  # the loop itself failed (a bug): let the process die and restart

    async def _watch(self, stop: asyncio.Event) -> None:
        """Until `stop`; raise when the AsyncBackend's engine has died, so the process exits and is
        restarted (its unacked requests go to another sampler meanwhile)."""
        while not stop.is_set():
            if self.backend.dead:
                raise RuntimeError("the sampling engine died")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.cfg.idle_wait_s)
            except asyncio.TimeoutError:
                pass

    def _serve_loop(self) -> None:
        """Admit queued jobs between decode steps; resolve each job when its request finishes."""
        scheduler = be.Scheduler(self.backend)
        active: dict[int, _Job] = {}
        n = 0
        while not self._halt.is_set():
            while len(active) < self.cfg.max_batch:
                try:
                    if active or not scheduler.idle:
                        job = self._jobs.get_nowait()
                    else:
                        job = self._jobs.get(timeout=self.cfg.idle_wait_s)
                except queue.Empty:
                    break
                error = self._load_adapter(job)
                if error is not None:
                    job.resolve(error)
                    continue
                try:
                    scheduler.add(n, job.spec)  # an invalid spec comes back from the next step
                except Exception as e:  # a bug: fail this request only
                    log.exception("sample_add_failed", request_id=job.msg.request_id)
                    job.resolve(InvalidRequest(f"sampler error: {e!r}"))
                    continue
                active[n] = job
                n += 1
            if scheduler.idle:
                continue
            started = time.perf_counter()
            try:
                finished = scheduler.step()
            except Exception as e:  # a bug or an OOM: fail the requests in flight, keep serving
                log.exception("sample_step_failed", requests=scheduler.requests, rows=scheduler.rows)
                error = InvalidRequest(f"sampler error: {e!r}")
                finished = [(i, error) for i in scheduler.abort()]
            finally:
                self._busy_s += time.perf_counter() - started
            for i, result in finished:
                job = active.pop(i)
                job.resolve(result)
                log.debug("sample_done", request_id=job.msg.request_id, rows=job.spec.num_samples,
                          ms=round((time.perf_counter() - job.queued) * 1000, 1))  # fmt: skip
        # Shutting down: requests still in flight are never answered here, so their messages are
        # not acked and go to another sampler (or this one, restarted).

    def _load_adapter(self, job: _Job) -> InvalidRequest | None:
        """Load the job's adapter into the backend if it is not there (right before admission,
        so an LRU eviction can never strand a job; running requests pin theirs)."""
        from safetensors.torch import load

        key = job.spec.adapter
        if key is None or self.backend.has_adapter(key):
            return None
        if job.blob is None:
            return InvalidRequest(f"adapter {key} is not available")
        try:
            state = load(job.blob)
            lora = job.msg.lora
            targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in state})
            self.backend.load_adapter(key, state, rank=lora.rank if lora else _rank(state), alpha=LORA_ALPHA, target_modules=targets)
            metrics.ADAPTER_LOADS.inc()
        except InvalidRequest as e:
            return e
        except Exception as e:  # a corrupt blob or a bug: fail this request only
            log.exception("adapter_load_failed", key=key)
            return InvalidRequest(f"sampler error loading adapter {key}: {e!r}")
        return None

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

    async def run(self, stop: asyncio.Event) -> None:
        log.info("sampler_ready", worker_id=self.worker_id, base_model=self.cfg.base_model, device=self.backend.info.device)
        try:
            await asyncio.gather(
                self.bus.heartbeat(self.worker_id, self.info, self.cfg.heartbeat_s, stop),
                self.serve(stop),
                self.bus.consume(
                    stream=subjects.SAMPLE_STREAM,
                    durable=subjects.sampler_consumer(self.cfg.base_model),
                    filter_subject=subjects.sample(self.cfg.base_model),
                    type_=SampleRequest,
                    handle=self.on_sample,
                    on_dead=lambda msg, reason: self.bus.fail_dead(msg.request_id, "Sample", reason),
                    ack_wait_s=self.cfg.ack_wait_s,
                    max_inflight=4 * self.cfg.max_batch,
                    batch=self.cfg.max_batch,
                    stop=stop,
                ),
            )
        finally:
            self._halt.set()
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

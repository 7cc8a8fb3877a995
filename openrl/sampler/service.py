"""The sampler process: competing consumers of one base model's sample queue.

Every sampler of a base model pulls from the same durable consumer on the `OPENRL_SAMPLE`
work queue, so N processes share the load and a request that a dead sampler held is
redelivered to another one (or to the restarted one) after `ack_wait`; while a request
is being generated its message is kept alive with in-progress acks.

The service only moves messages: it decodes a request into a `SampleSpec`, checks it (before
anything is allocated for it), fetches its adapter's weights, and awaits the engine's
`sample` (the `AsyncBackend` protocol below) on its event loop, one call per request; the
engine batches the requests in flight on its own: transformers (`hf_engine.HfEngine`, a compute
thread of its own) or vLLM (`vllm_backend.VllmSampler`). The handler stores the future and acks.

Adapters are versioned by the model and seq_id they were saved at (`adapters/<model>/
seq-<n>` in the object store), so "the weights as of that point in the model's sequence"
is a lookup, never a race. Fetched adapters are cached as bytes (bounded LRU) and loaded
into the engine on demand.

A request's failure is its own: a user error (InvalidRequest) fails its future with category
"user"; any other exception from the engine fails it with category "server" (the others in
its batch complete: the engine isolates them); only a dead engine leaves the message unacked,
for another sampler.

A request whose client left (an OpenAI stream closed) is cancelled by the gateway: it fails the
future, then publishes a core-NATS notice (`subjects.cancel`). A sampler generating the request
cancels the engine's `sample` call (the engine drops its rows at its next step boundary), records
nothing and acks the message: the request is finished, its future already says so. A notice that
comes before the engine has the request (weights still being fetched) is remembered for a while.
A notice can be missed (the sampler reconnecting): the request then runs to the end, and the
compare-and-set on the pending future stores nothing over the cancelled one. Either way no usage
is recorded: usage is billed for results stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np
import structlog

from openrl import metrics
from openrl.bus import objects, paths, subjects
from openrl.bus.client import Bus
from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import (
    AdapterStored,
    MAX_REQUEST_ELEMENTS,
    MAX_TENSOR_COLUMNS,
    Future,
    SampledSequence,
    SampleRequest,
    SampleResult,
    Tensor,
    TopK,
    UsageRecord,
    WorkerInfo,
    decode,
    encode,
)
from openrl.bus.sampling import params_of
from openrl.sampler import spec as sp

log = structlog.get_logger(__name__)

# Cancel notices kept for requests that are not in this sampler's engine (yet): enough for the
# requests any one sampler can have between pulling a message and starting its generation.
MAX_REMEMBERED_CANCELS = 4096


@dataclass(frozen=True)
class SamplerConfig:
    base_model: str
    model_path: str
    nats_url: str = "nats://127.0.0.1:4222"
    worker_id: str = ""
    default_max_tokens: int = sp.DEFAULT_MAX_TOKENS  # what a request's max_tokens=None means
    max_batch: int = 64  # requests generating at once; more wait in the engine's queue
    idle_wait_s: float = 0.25  # how often the service checks that its engine is alive
    cached_adapters: int = 32  # adapter blobs kept in memory
    heartbeat_s: float = 2.0
    ack_wait_s: float = 10.0  # a dead sampler's requests go to another after this; in-progress acks keep live ones


class Aborted(Exception):
    """The request was cancelled (its client left) while this sampler had it: nothing to record."""

    def __init__(self, generating_s: float | None):
        super().__init__("cancelled")
        self.generating_s = generating_s  # how long the engine had it; None: it never reached the engine


class EngineFailed(Exception):
    """The engine failed a request for a reason that is not the request's: category "server"."""


class AsyncBackend(Protocol):
    """A sampling engine: batches the requests in flight on its own (hf_engine.HfEngine, vllm_backend.VllmSampler)."""

    info: sp.SamplerInfo

    def validate(self, spec: sp.SampleSpec) -> None:
        """Raise InvalidRequest naming the bad field. No compute."""

    async def sample(self, spec: sp.SampleSpec, blob: bytes | None) -> sp.SampleResult:
        """The request's result (its adapter loaded from `blob` if needed). InvalidRequest: a user
        error; any other exception: a server error (`dead` says whether the engine is gone).
        Cancelling the call aborts the request: the engine stops computing it at its next step and
        frees what it held (HfEngine drops its rows; vLLM's AsyncLLM.generate aborts on cancel)."""

    @property
    def dead(self) -> bool:
        """The engine has failed for good: the process should exit (and be restarted)."""

    def close(self) -> None:
        """Stop the engine and free what it holds."""


class Sampler:
    def __init__(self, cfg: SamplerConfig, bus: Bus, backend: AsyncBackend):
        self.cfg = cfg
        self.bus = bus
        self.backend = backend
        self._inflight = 0  # requests the engine is generating
        self._busy_from = 0.0
        self.worker_id = cfg.worker_id or f"sampler-{socket.gethostname()}-{os.getpid()}"
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._fetching: dict[str, asyncio.Future] = {}
        self._busy_s = 0.0
        self._started = time.time()
        self._stop: asyncio.Event | None = None  # run's: once set, requests in flight are handed back
        self._generating: dict[str, asyncio.Future] = {}  # the engine's sample calls, by subjects.token(request id)
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # recent notices for requests not in the engine here
        self.served = 0

    # -- requests

    def spec(self, msg: SampleRequest, owner: str = "") -> sp.SampleSpec:
        """The engine's request for `msg` (of the API key `owner`, as its future says). Sizes are
        checked before anything is allocated for them (a message need not have come through a
        gateway)."""
        if len(msg.prompt) % 4:
            raise InvalidRequest("prompt: packed int32 token ids expected")
        n, context = len(msg.prompt) // 4, self.backend.info.max_context
        if n == 0:
            raise InvalidRequest("prompt is empty")
        if n > context:
            raise InvalidRequest(f"prompt ({n} tokens) exceeds the model's context of {context} tokens")
        target = None
        if msg.target_prompt_logprobs is not None:
            target = _dense_int64(msg.target_prompt_logprobs, rows=n - 1, pad=-1)
        return sp.SampleSpec(
            prompt=np.frombuffer(msg.prompt, dtype="<i4").tolist(),
            num_samples=msg.num_samples,
            params=params_of(msg),
            default_max_tokens=self.cfg.default_max_tokens,
            prompt_logprobs=msg.prompt_logprobs,
            prompt_logprobs_last_n=msg.prompt_logprobs_last_n,
            topk_prompt_logprobs=msg.topk_prompt_logprobs,
            topk_sample_logprobs=msg.topk_sample_logprobs,
            target_prompt_logprobs=target,
            prompt_alt_tokens_k=msg.prompt_alt_tokens_k,
            adapter=msg.weights,
            owner=owner,
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
            spec = self.spec(msg, stored.owner)
            # Content checks now; the adapter is looked up by the engine.
            self.backend.validate(dataclasses.replace(spec, adapter=None))
            # Fetch the weights now, so the engine never waits on the network.
            blob = await self._blob(msg.weights) if msg.weights is not None else None
            result = await self._sample(msg.request_id, spec, blob)
            fut = Future(state="done", content_type="sample", payload=encode(to_bus(result, msg.target_prompt_logprobs)), finished_at=time.time(), **base)
            self.served += 1
            metrics.SAMPLED_TOKENS.inc(sum(len(seq.tokens) for seq in result.sequences))
            usage = (len(msg.prompt) // 4, sum(len(seq.tokens) for seq in result.sequences), time.perf_counter() - started)
        except InvalidRequest as e:
            fut = Future(state="failed", error=str(e), category="user", finished_at=time.time(), **base)
        except EngineFailed as e:
            fut = Future(state="failed", error=str(e), category="server", finished_at=time.time(), **base)
        except Aborted as e:  # the gateway failed the future already: acked, nothing stored or billed
            log.info("sample_aborted", request_id=msg.request_id, generating_s=e.generating_s)
            return
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

    async def _sample(self, request_id: str, spec: sp.SampleSpec, blob: bytes | None) -> sp.SampleResult:
        """The engine's result; the time with any request in flight counts as busy. An engine's
        failure that is not the request's is EngineFailed, unless the engine is dead: then the
        message stays unacked for another sampler. (Other failures, a bus error fetching the
        weights say, are not caught here: the message is handed back and retried.)"""
        key = subjects.token(request_id)
        if key in self._cancelled:  # its notice came while the weights were fetched
            del self._cancelled[key]
            raise Aborted(None)
        if self._inflight == 0:
            self._busy_from = time.perf_counter()
        self._inflight += 1
        try:
            return await self._generate(key, self.backend.sample(spec, blob))
        except (InvalidRequest, Aborted):
            raise
        except Exception as e:
            if self.backend.dead:
                raise
            log.exception("sample_failed")
            raise EngineFailed(f"sampler error: {e}") from e
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._busy_s += time.perf_counter() - self._busy_from

    async def _generate(self, key: str, work) -> sp.SampleResult:
        """`work`'s result (the engine's sample call). A cancel notice for the request cancels it:
        Aborted. Once the process is stopping, cancel it and hand the message back (CancelledError:
        the bus naks it, for another sampler), without waiting for it to finish."""
        task = asyncio.ensure_future(work)
        self._generating[key] = task
        started = time.perf_counter()
        stopping = asyncio.ensure_future(self._stop.wait()) if self._stop is not None else None
        try:
            await asyncio.wait([task] if stopping is None else [task, stopping], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this handler was cancelled: so is its work
            task.cancel()
            raise
        finally:
            if stopping is not None:
                stopping.cancel()
            if self._generating.get(key) is task:  # (a redelivered copy may be running too)
                del self._generating[key]
        if task.cancelled():  # by _on_cancel
            raise Aborted(round(time.perf_counter() - started, 3))
        if not task.done():
            task.cancel()
            raise asyncio.CancelledError("the sampler is stopping")
        return task.result()

    async def _on_cancel(self, raw) -> None:
        """A cancel notice (subjects.cancel): the request's client left and its future is failed.
        Generating it here: cancel the engine's call. Not yet: remember it (bounded), so that it
        never starts here; most notices are for requests another sampler holds, or none does."""
        key = raw.subject.rsplit(".", 1)[-1]
        task = self._generating.get(key)
        if task is not None:
            task.cancel()
            return
        self._cancelled[key] = None
        while len(self._cancelled) > MAX_REMEMBERED_CANCELS:
            self._cancelled.popitem(last=False)

    async def _blob(self, name: str) -> bytes:
        blob = self._blobs.get(name)
        metrics.ADAPTER_CACHE.inc(result="miss" if blob is None else "hit")
        if blob is not None:
            self._blobs.move_to_end(name)
            return blob
        return await asyncio.shield(self._start_fetch(name))

    def _start_fetch(self, name: str) -> asyncio.Future:
        """The fetch of `name` in flight, started if none is (one fetch per object at a time)."""
        pending = self._fetching.get(name)
        if pending is None:
            pending = self._fetching[name] = asyncio.ensure_future(self._fetch(name))
            pending.add_done_callback(lambda _: self._fetching.pop(name, None))
        return pending

    async def _on_adapter_stored(self, raw) -> None:
        """A trainer stored a sampler weights version (AdapterStored): fetch it now when this
        sampler served an earlier version of the model (one is cached here), so that the first
        sample request naming it finds it cached: a training loop's next version usually goes where
        the last one went. Others are left alone: every sampler fetching every version of every
        model would multiply the store's reads by the samplers. Which version a request samples is
        still the one its message names (the object is per seq_id): a prefetch only fills the cache."""
        try:
            notice = decode(raw.data, AdapterStored)
        except msgspec.MsgspecError:
            return
        prefix = paths.adapter_object(notice.model_id, 0).rsplit("/", 1)[0] + "/"
        if not notice.object.startswith(prefix) or notice.object in self._blobs or notice.object in self._fetching:
            return
        if not any(name.startswith(prefix) for name in self._blobs):
            return
        metrics.ADAPTER_CACHE.inc(result="prefetch")
        self._start_fetch(notice.object).add_done_callback(_log_prefetch_failure)

    async def _fetch(self, name: str) -> bytes:
        try:
            data = await objects.read(self.bus.js, self.bus.objects, name)
        except objects.GONE:
            raise InvalidRequest(f"the weights of this sampling session ({name}) are not available") from None
        self._blobs[name] = data
        while len(self._blobs) > self.cfg.cached_adapters:
            self._blobs.popitem(last=False)
        log.info("adapter_fetched", object=name, bytes=len(data))
        return data

    async def serve(self, stop: asyncio.Event) -> None:
        """Until `stop`; raise when the engine has died, so the process exits and is restarted
        (its unacked requests go to another sampler meanwhile)."""
        while not stop.is_set():
            if self.backend.dead:
                raise RuntimeError("the sampling engine died")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.cfg.idle_wait_s)
            except asyncio.TimeoutError:
                pass

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
        self._stop = stop
        cancels = await self.bus.nc.subscribe(subjects.cancel_all(self.cfg.base_model), cb=self._on_cancel)
        stored = await self.bus.nc.subscribe(subjects.adapter_stored(self.cfg.base_model), cb=self._on_adapter_stored)
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
            for sub in (cancels, stored):
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection is gone already
                    pass


def _log_prefetch_failure(fut: asyncio.Future) -> None:
    """A prefetch that failed is only a head start lost: the request that needs the object
    fetches it again and meets the error there, if it lasts."""
    if not fut.cancelled() and fut.exception() is not None:
        log.info("adapter_prefetch_failed", error=repr(fut.exception()))


def _dense_int64(t: Tensor, *, rows: int, pad: int) -> np.ndarray:
    """target_prompt_logprobs (dense or CSR) as a dense int64 [rows, K] array; unlisted CSR cells
    get `pad`. Every size is checked against the limits before anything is allocated for it."""
    where = "target_prompt_logprobs"
    if t.dtype != "int64":
        raise InvalidRequest(f"{where} must be int64, got {t.dtype}")
    shape = t.shape if t.shape else [len(t.data) // 8]
    if len(shape) != 2 or shape[0] != rows or shape[1] < 0:
        raise InvalidRequest(f"{where} must be an integer [len(prompt) - 1, K] = [{rows}, K] tensor, got shape {shape}")
    cols = shape[1]
    if cols > MAX_TENSOR_COLUMNS:
        raise InvalidRequest(f"{where}: at most {MAX_TENSOR_COLUMNS} columns, got {cols}")
    if rows * cols > MAX_REQUEST_ELEMENTS:
        raise InvalidRequest(f"{where}: at most {MAX_REQUEST_ELEMENTS} elements (rows x columns), got {rows} x {cols}")
    if len(t.data) % 8:
        raise InvalidRequest(f"{where}: packed int64 values expected")
    values = np.frombuffer(t.data, dtype="<i8")
    if t.crow is None:
        if len(values) != rows * cols:
            raise InvalidRequest(f"{where}: shape {shape} does not match {len(values)} values")
        return values.reshape(rows, cols).copy()
    if len(t.crow) != 8 * (rows + 1) or len(t.col or b"") != len(t.data):
        raise InvalidRequest(f"{where}: malformed CSR indices")
    crow = np.frombuffer(t.crow, dtype="<i8")
    col = np.frombuffer(t.col or b"", dtype="<i8")
    if crow[0] != 0 or crow[-1] != len(col) or (np.diff(crow) < 0).any() or (len(col) and (col.min() < 0 or col.max() >= cols)):
        raise InvalidRequest(f"{where}: malformed CSR indices")
    dense = np.full((rows, cols), pad, dtype=np.int64)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense


def to_bus(result: sp.SampleResult, request: Tensor | None = None) -> SampleResult:
    """The engine's numpy result as the bus message (packed little-endian bytes).
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

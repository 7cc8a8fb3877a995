"""The transformers engine behind the sampler's backend protocol (service.AsyncBackend), as vLLM's
AsyncLLM is: the service awaits `sample(spec, blob)` on its event loop, one call per request, and
knows nothing of threads. The engine's own compute thread runs a `Scheduler` (continuous batching,
hf_batching.py) over a `TransformersSampler` (hf_model.py): it admits what is queued into the
running decode between steps (at most `max_requests` requests at once, base model and adapters
mixed in every forward) and hands each request's result back as soon as its last row stops.
Both admissions, into the running requests and into the decode's rows, are fair between the
requests' owner keys (openrl/fair.py), not first come first served; and while other keys have
work, a key's rows in the decode are held to its share (hf_batching.MIN_SHARE_ROWS).

    engine = HfEngine(TransformersSampler(path), max_requests=64)
    result = await engine.sample(SampleSpec(prompt=ids, num_samples=4), blob)   # blob: the adapter's safetensors, or None
    engine.close()

An adapter is loaded from its blob on the compute thread right before its request joins the
decode (so an LRU eviction can never strand a queued request; running requests pin theirs).

Cancelling a `sample` call (the service does, when the request's client has left) drops the
request: skipped if it is still queued, its rows taken out of the running decode at the next
step boundary if it runs (`Scheduler.cancel`), its adapter slot unpinned; the other rows go on.

Failures, each confined to the request it belongs to:
- `InvalidRequest` (the request's fields, or its adapter's weights, are wrong): raised to that
  caller only; nothing else is touched.
- A step that raises (a bug, out of memory): every request in the batch is taken out of it and run
  again alone, one at a time, before anything new is admitted. A request that fails alone raises
  `SampleFailed` (a server error, not the user's); the others complete. A seeded request gives
  the same tokens when it is run again.
- The compute thread itself dies (a bug in this loop): `dead` turns True, and the service exits
  so that its unanswered requests go to another sampler.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import structlog
from safetensors.torch import load

from openrl import metrics
from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import LORA_ALPHA
from openrl.fair import FairShare
from openrl.sampler.hf_batching import Scheduler
from openrl.sampler.hf_model import SlotsBusy, TransformersSampler
from openrl.sampler.spec import SampleResult, SamplerInfo, SampleSpec, check_spec

log = structlog.get_logger(__name__)


class SampleFailed(RuntimeError):
    """The engine could not sample a request, for a reason that is not the request's (a server error)."""


@dataclass
class _Job:
    spec: SampleSpec
    blob: bytes | None  # the adapter's weights, None for the base model (or an adapter already loaded)
    done: asyncio.Future
    loop: asyncio.AbstractEventLoop
    solo: bool = False  # a step failed with it in the batch: it runs alone
    cancelled: bool = False  # its caller stopped waiting: skipped if queued, dropped between steps if running
    queued: float = field(default_factory=time.perf_counter)

    def resolve(self, result: SampleResult | BaseException) -> None:
        """From the compute thread: hand the result (or the error to raise) to the caller."""
        try:
            self.loop.call_soon_threadsafe(_set_result, self.done, result)
        except RuntimeError:  # the event loop is closed: shutting down, nobody is waiting
            pass


def _set_result(done: asyncio.Future, result) -> None:
    if not done.done():
        done.set_result(result)


class HfEngine:
    def __init__(
        self, sampler: TransformersSampler, *, max_requests: int = 64, idle_wait_s: float = 0.25, slot_wait_s: float = 60.0
    ):
        self.sampler = sampler
        self.info: SamplerInfo = sampler.info
        self.max_requests = max_requests
        self.idle_wait_s = idle_wait_s  # the idle compute thread checks for `close` this often
        # A request whose adapter finds every slot pinned by requests in flight waits this long
        # for one to free up, then fails (SampleFailed); it never runs on another adapter.
        self.slot_wait_s = slot_wait_s
        self._blocked: deque[_Job] = deque()  # waiting for a free adapter slot, oldest first
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openrl-sample-compute", daemon=True)
        self._thread.start()

    # -- the backend protocol

    def validate(self, spec: SampleSpec) -> None:
        """Raise InvalidRequest naming the bad field. No compute; adapters are looked up when the
        request is admitted."""
        check_spec(spec, self.info)

    async def sample(self, spec: SampleSpec, blob: bytes | None = None) -> SampleResult:
        """Every row of `spec` (its adapter loaded from `blob` if it is not loaded). Raises
        InvalidRequest for a user error, SampleFailed for a server error."""
        loop = asyncio.get_running_loop()
        job = _Job(spec=spec, blob=blob, done=loop.create_future(), loop=loop)
        self._jobs.put(job)
        try:
            result = await job.done
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if isinstance(result, BaseException):
            raise result
        return result

    @property
    def dead(self) -> bool:
        """The compute thread has died (not closed): nothing queued will be answered."""
        return not self._thread.is_alive() and not self._halt.is_set()

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=60)

    # -- the compute thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug in the loop itself: `dead` says so, and the service exits
            log.exception("sample_engine_died")

    def _loop(self) -> None:
        """Admit queued jobs between decode steps, fairly between keys; resolve each job when its
        request finishes. After a failed step, its requests run one at a time before anything new
        is admitted."""
        scheduler = Scheduler(self.sampler)
        active: dict[int, _Job] = {}
        solo: deque[_Job] = deque()
        pending: list[_Job] = []  # taken off the queue, not yet admitted (at most max_requests run)
        share = FairShare()
        numbers = itertools.count()
        while not self._halt.is_set():
            self._drop_cancelled(scheduler, active)
            if solo:
                if not active and not (job := solo.popleft()).cancelled:
                    self._admit(scheduler, next(numbers), job, active)
            else:
                self._retry_blocked(scheduler, numbers, active)
                self._take(pending, wait=not (active or pending or not scheduler.idle))
                while pending and len(active) < self.max_requests:
                    job = pending.pop(share.pick(pending, key=lambda j: j.spec.owner))
                    share.charge(job.spec.owner, job.spec.cost)
                    self._admit(scheduler, next(numbers), job, active)
            if scheduler.idle:
                continue
            try:
                finished = scheduler.step()
            except Exception as e:  # a bug or an OOM: which request caused it is not known
                log.exception("sample_step_failed", requests=scheduler.requests, rows=scheduler.rows)
                finished = []
                for i in scheduler.abort():
                    job = active.pop(i)
                    if job.solo:  # it fails alone: its own failure
                        job.resolve(SampleFailed(f"sampler error: {e!r}"))
                    else:
                        job.solo = True
                        solo.append(job)
            for i, result in finished:
                job = active.pop(i)
                job.resolve(result)
                log.debug("sample_done", rows=job.spec.num_samples, ms=round((time.perf_counter() - job.queued) * 1000, 1))
        # Closing: requests still in flight are never answered here; the service does not ack
        # their messages, so they go to another sampler (or this one, restarted).

    def _take(self, pending: list[_Job], wait: bool) -> None:
        """Move every queued job to `pending` (waiting up to `idle_wait_s` for one if `wait`);
        drop the cancelled ones."""
        try:
            if wait:
                pending.append(self._jobs.get(timeout=self.idle_wait_s))
            while True:
                pending.append(self._jobs.get_nowait())
        except queue.Empty:
            pass
        pending[:] = [job for job in pending if not job.cancelled]

    def _drop_cancelled(self, scheduler: Scheduler, active: dict[int, _Job]) -> None:
        """Take the requests whose callers stopped waiting (a cancelled `sample`: the client left)
        out of the decode now, between steps: their rows and cache go, their slots free up."""
        for number in [n for n, job in active.items() if job.cancelled]:
            job = active.pop(number)
            scheduler.cancel(number)
            log.info("sample_cancelled", rows=job.spec.num_samples, max_tokens=job.spec.max_tokens,
                     seconds=round(time.perf_counter() - job.queued, 3))  # fmt: skip

    def _retry_blocked(self, scheduler: Scheduler, numbers, active: dict[int, _Job]) -> None:
        """Admit the jobs that waited for an adapter slot, in order, while slots free up; fail
        those that waited past `slot_wait_s`."""
        for _ in range(len(self._blocked)):
            if len(active) >= self.max_requests:
                return
            job = self._blocked.popleft()
            if not job.cancelled:
                self._admit(scheduler, next(numbers), job, active)

    def _admit(self, scheduler: Scheduler, number: int, job: _Job, active: dict[int, _Job]) -> None:
        """Load the job's adapter if needed and add its request to the scheduler, or resolve the job
        with the error that stops it. Every slot pinned: the job waits (`_blocked`), with a bound."""
        error = self._load_adapter(job)
        if isinstance(error, SlotsBusy):
            waited = time.perf_counter() - job.queued
            if waited < self.slot_wait_s and not scheduler.idle:
                self._blocked.append(job)
                return
            error = SampleFailed(f"{error} (waited {waited:.1f} s for a free slot)")
        if error is not None:
            job.resolve(error)
            return
        try:
            scheduler.add(number, job.spec)  # an invalid spec comes back from the next step
        except Exception as e:  # a bug: fail this request only
            log.exception("sample_add_failed")
            job.resolve(SampleFailed(f"sampler error: {e!r}"))
            return
        active[number] = job

    def _load_adapter(self, job: _Job) -> BaseException | None:
        """Load the job's adapter into the sampler if it is not there (right before admission)."""
        key = job.spec.adapter
        if key is None or self.sampler.has_adapter(key):
            return None
        if job.blob is None:
            return InvalidRequest(f"adapter {key} is not available")
        try:
            state = load(bytes(job.blob))
        except Exception as e:  # safetensors raises its own error type for malformed bytes
            return InvalidRequest(f"adapter weights are not valid safetensors: {e}")
        try:
            rank = next((int(v.shape[0]) for k, v in state.items() if "lora_A" in k and v.ndim == 2), 0)
            targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in state})
            self.sampler.load_adapter(key, state, rank=rank, alpha=LORA_ALPHA, target_modules=targets)
        except (InvalidRequest, SlotsBusy) as e:
            return e
        except Exception as e:  # a bug: fail this request only
            log.exception("adapter_load_failed", key=key)
            return SampleFailed(f"sampler error loading adapter {key}: {e!r}")
        metrics.ADAPTER_LOADS.inc()
        return None

"""The trainer process: many LoRA tenants of one base model, fed by the bus.

Order and exactly-once (ARCHITECTURE.md, contract 2):
- each model has a `Tenant` with `next_seq`; a request waits (unacked, kept alive with
  in-progress acks) until its seq_id is next, runs, and only then is acked;
- a request whose seq_id is already applied is a duplicate: acked, never re-applied;
- a model this process does not hold yet is *hydrated*: re-created from its record (the
  LoRA init is a pure function of the seed) and brought forward by replaying, in seq
  order, every request of its log (the train stream) up to the first gap in seq_ids. The
  previous owner applied a prefix of that sequence and nothing else, so after a kill -9
  the state is the same as if nothing had happened (on CPU, bit for bit). Requests past
  that prefix are applied now and their futures finished here; their redelivered
  messages then count as duplicates.
  Every `snapshot_every` requests (at an optim_step) the model's full state is stored in the
  object store, and recovery starts from the newest snapshot, replaying only what follows.

All model compute runs on one thread, so the event loop stays free for heartbeats and
in-progress acks while a step runs. What runs next on it is chosen fairly between API keys by
the tokens each has run (`compute.FairCompute`, docs/limits.md "Fairness"), not in arrival order.

This file is the sequencing (turns, duplicates, futures) and the holding of models; which
trainer owns a model is `leases.py`, what a model is rebuilt from is `recovery.py`, the math is
`engine.py` (or `group.GroupEngine` for a trainer group).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
import structlog
from nats.js.errors import NotFoundError

from openrl import metrics
from openrl.bus import objects, paths, subjects
from openrl.bus.client import DEAD_LETTERED, Bus
from openrl.bus.errors import InvalidRequest, Unavailable
from openrl.bus.messages import (
    AdapterStored,
    UsageRecord,
    CreateModel,
    ForwardBackward,
    ForwardBackwardResult,
    Future,
    ModelRecord,
    OptimStep,
    Rejected,
    LoadWeights,
    SaveWeights,
    TrainRequest,
    WeightsRecord,
    WorkerInfo,
    encode,
)
from openrl.trainer import recovery, weights
from openrl.trainer.compute import FairCompute
from openrl.trainer.engine import LoraEngine
from openrl.trainer.leases import Leases, least_loaded

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TrainerConfig:
    base_model: str  # the name clients use, e.g. "openrl/tiny-qwen3" or "Qwen/Qwen3-0.6B"
    model_path: str  # what from_pretrained loads (a local snapshot dir or the same name)
    tokenizer_id: str = ""  # what get_info reports; defaults to base_model
    nats_url: str = "nats://127.0.0.1:4222"
    worker_id: str = ""
    heartbeat_s: float = 2.0
    # A request held by a trainer that died is redelivered after this; live ones are kept alive
    # with in-progress acks (every ack_wait_s / 3), so it bounds recovery, not step time.
    ack_wait_s: float = 10.0
    # A model's full state is snapshotted at the first optim_step at least this many requests
    # after the last snapshot (0: never); recovery replays at most about this many requests.
    snapshot_every: int = 64
    # How often ownership is checked: orphaned models (owner's heartbeat gone) are taken over,
    # models whose lease moved elsewhere are released.
    lease_check_s: float = 1.0
    # Per-model durable consumers nobody pulls from for this long are deleted by the server
    # (a model idle that long is rebuilt from its snapshot + log when it comes back).
    consumer_idle_s: float = 24 * 3600
    # A training request delivered more often than this (its trainer kept dying on it) is
    # dead-lettered and fails in its place in the sequence. Higher than the bus default: a
    # model moving between trainers hands its queued requests back, which counts too.
    max_deliver: int = 20
    # Bounds on what a model's requests may hold while they wait for their turn (docs/limits.md):
    # a request more than `max_seq_ahead` past the model's next seq_id is refused (its future
    # fails, its seq_id is skipped when the sequence reaches it); a waiting request that would
    # take the bytes held for its model, or for all models, past these caps is handed back
    # (nak) and comes again later. The next request of a model is always taken.
    max_seq_ahead: int = 1024
    max_held_bytes_per_model: int = 256 * 1024 * 1024
    max_held_bytes: int = 1024 * 1024 * 1024
    # forward_backward requests of up to this many models, ready at once, run in shared
    # micro-batches (LoraEngine.forward_backward_many; docs/tenants.md). 1: each alone.
    max_shared_requests: int = 8


# How the future of a request refused for being too far ahead starts its error: a rebuild
# replaying the log reads it, and skips that seq_id as the first owner did.
TOO_FAR_AHEAD = "too far ahead"


# What a call that is not a forward pass costs a key, in tokens (an optim_step, a save's export, a
# rebuild's import): about a small step's worth, so that a key's many small calls still count.
OTHER_COST = 64


def cost_of(msg: TrainRequest) -> int:
    """A request's cost on the compute thread, in tokens (rows x length of its datums)."""
    if isinstance(msg, ForwardBackward):
        return max(sum(len(d.tokens) // 4 for d in msg.data), 1)
    return OTHER_COST


def _failed(msg: TrainRequest, owner: str, error: str, category: str) -> Future:
    """The failed future of a training request, finished now."""
    return Future(request_id=msg.request_id, owner=owner, request_type=type(msg).__name__, state="failed", error=error,
                  category=category, finished_at=time.time())  # fmt: skip


def held_size(msg: TrainRequest) -> int:
    """The bytes a waiting request holds: its token and tensor buffers (others are small)."""
    if not isinstance(msg, ForwardBackward):
        return 1024
    return 1024 + sum(
        len(d.tokens) + sum(len(t.data) + len(t.crow or b"") + len(t.col or b"") for t in d.loss_fn_inputs.values()) for d in msg.data
    )


class _Reported(msgspec.Struct):
    """The metrics of a forward_backward's or optim_step's result, read back for its usage
    record (the rest of the payload, logprobs included, is skipped)."""

    metrics: dict[str, float | None] = {}  # JSON writes a NaN as null

    def present(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if v is not None}


@dataclass
class Tenant:
    model_id: str
    owner: str
    next_seq: int
    turn: asyncio.Condition
    record: ModelRecord
    since_snapshot: int = 0
    first_unapplied: int | None = None  # stream sequence a new durable consumer starts at
    # seq_ids refused as too far ahead: skipped when reached. At most max_seq_ahead of them, each
    # at most twice the window past next_seq when refused (the place of a client that pipelined
    # past the window); one further ahead is refused without being remembered (docs/limits.md).
    refused: set[int] = field(default_factory=set)
    held_bytes: int = 0  # what this model's waiting requests hold (held_size)

    def skip_refused(self) -> None:
        while self.next_seq in self.refused:
            self.refused.discard(self.next_seq)
            self.next_seq += 1


@dataclass
class Held:
    """A model this trainer owns: the task consuming its training requests."""

    stop: asyncio.Event
    task: asyncio.Task


class Trainer:
    def __init__(self, cfg: TrainerConfig, bus: Bus, engine: LoraEngine):
        self.cfg = cfg
        self.bus = bus
        self.engine = engine
        self.worker_id = cfg.worker_id or f"trainer-{socket.gethostname()}-{os.getpid()}"
        self.tenants: dict[str, Tenant] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Ownership (leases.py): every lease of this base model as last seen, and the models
        # this process holds (consumes the training requests of).
        self.leases = Leases(bus, cfg.base_model, self.worker_id, on_change=self._reconcile)
        self.held: dict[str, Held] = {}
        self._acquiring: dict[str, asyncio.Task] = {}
        self._stop = asyncio.Event()
        self._recent: OrderedDict[str, Future] = OrderedDict()  # re-sent if a KV write was lost
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        # The one compute thread, taken in turn fairly between keys; forward_backward requests of
        # several models ready at once share passes (LoraEngine.forward_backward_many).
        self._compute = FairCompute(self._pool, max_shared=cfg.max_shared_requests)
        self._started = time.time()
        self._held_bytes = 0  # what waiting requests of every model hold

    # -- compute on the single compute thread

    async def _run(self, fn, *args, key: str = "", cost: int = OTHER_COST):
        """`fn(*args)` on the compute thread, in `key`'s fair turn (key "": the trainer's own work)."""
        return await self._compute.call(key, cost, fn, *args)

    def _apply(self, msg: TrainRequest, owner: str) -> Future:
        """Run one training request. Never raises: errors become failed futures."""
        try:
            if isinstance(msg, Rejected):
                if msg.category == "server":
                    return _failed(msg, owner, msg.error, "server")
                raise InvalidRequest(msg.error)
            if isinstance(msg, ForwardBackward):
                return self._fb_future(msg, owner, self.engine.forward_backward(msg))
            step_metrics = self.engine.optim_step(msg.model_id, msg.adam)
            metrics.OPTIM_STEPS.inc()
            return Future(request_id=msg.request_id, owner=owner, request_type="OptimStep", state="done",
                          payload=msgspec.json.encode({"metrics": step_metrics}), finished_at=time.time())  # fmt: skip
        except InvalidRequest as e:
            return _failed(msg, owner, str(e), "user")
        except Exception as e:  # a bug or an OOM: fail this request, keep serving
            log.exception("train_request_failed", model_id=msg.model_id, seq_id=msg.seq_id)
            return _failed(msg, owner, f"trainer error: {e!r}", "server")

    def _fb_future(self, msg: ForwardBackward, owner: str, out) -> Future:
        """The done future of a forward_backward whose work has just ended (its finish time)."""
        metrics.TRAINED_TOKENS.inc(sum(len(d.tokens) // 4 for d in msg.data), **{"pass": "forward" if msg.forward_only else "forward_backward"})
        result = ForwardBackwardResult(
            logprobs=[a.astype("<f4").tobytes() for a in out.logprobs],
            metrics=out.metrics,
            trailing=[list(a.shape[1:]) for a in out.logprobs],
        )
        kind = "Forward" if msg.forward_only else "ForwardBackward"
        return Future(request_id=msg.request_id, owner=owner, request_type=kind, state="done", content_type="forward_backward",
                      payload=encode(result), finished_at=time.time())  # fmt: skip

    def _apply_many(self, items: list[tuple[ForwardBackward, str]]) -> list[Future]:
        """Several models' forward_backward requests in shared passes (engine.forward_backward_many).
        Never raises: a failure of the shared pass (a bug, OOM) runs each request alone instead."""
        try:
            outs = self.engine.forward_backward_many([msg for msg, _ in items])
        except Exception:
            log.exception("shared_pass_failed", requests=len(items))
            return [self._apply(msg, owner) for msg, owner in items]
        return [
            _failed(msg, owner, str(out), "user") if isinstance(out, InvalidRequest) else self._fb_future(msg, owner, out)
            for (msg, owner), out in zip(items, outs, strict=True)
        ]

    def _apply_steps(self, msg: ForwardBackward, owner: str):
        """`_apply` of a forward_backward a micro-batch per step (a generator that returns the
        Future; never raises)."""
        try:
            out = yield from self.engine.forward_backward_steps(msg)
        except InvalidRequest as e:
            return _failed(msg, owner, str(e), "user")
        except Exception as e:  # a bug or an OOM: fail this request, keep serving
            log.exception("train_request_failed", model_id=msg.model_id, seq_id=msg.seq_id)
            return _failed(msg, owner, f"trainer error: {e!r}", "server")
        return self._fb_future(msg, owner, out)  # when its last step ends, not its first

    def _apply_shared(self, items: list[tuple[ForwardBackward, str]]) -> list[Future]:
        """forward_backward requests of several models, ready at once, in one call: shared passes
        (`_apply_many`); one alone as usual. Each model holds its turn while its request waits,
        so a call has at most one request per model and it is that model's next in sequence:
        order and exactly-once are unchanged."""
        if len(items) == 1:
            return [self._apply(*items[0])]
        log.debug("shared_pass", requests=len(items))
        return self._apply_many(items)

    async def _step(self, msg: TrainRequest, rec: ModelRecord, usage_after: list | None = None) -> Future:
        """Apply one request of the model's sequence; the caller holds the model's turn.
        `usage_after`: a list to put the billing usage record in, for the caller to publish
        (`_publish_usage`) after the result is out, rather than on the request's hot path."""
        if isinstance(msg, SaveWeights):
            return await self._save(msg, rec)
        if isinstance(msg, LoadWeights):
            return await self._load(msg, rec)
        started = time.perf_counter()
        # A trainer group's engine (group.py) runs each request alone on every rank.
        if isinstance(msg, ForwardBackward) and isinstance(self.engine, LoraEngine) and (
            cost_of(msg) > self.engine.microbatch_tokens or self.engine.pausable(cost_of(msg))
        ):
            # More than one micro-batch, or a pass long enough to pause inside (engine.pauses.py):
            # a micro-batch or a slice of a pass per turn of its key, other keys' work runs between.
            fut = await self._compute.steps(rec.owner, cost_of(msg), self._apply_steps, msg, rec.owner)
        elif isinstance(msg, ForwardBackward) and self.cfg.max_shared_requests > 1 and isinstance(self.engine, LoraEngine):
            # Cancelled before its call starts, it never runs (as a queued executor call).
            fut = await self._compute.submit(rec.owner, cost_of(msg), self._apply_shared, (msg, rec.owner), kind=("fb", msg.forward_only))
        else:
            fut = await self._run(self._apply, msg, rec.owner, key=rec.owner, cost=cost_of(msg))
        if isinstance(msg, (ForwardBackward, OptimStep)) and fut.state == "done":  # billing usage (read back deduplicated by request id)
            try:
                if isinstance(msg, ForwardBackward):
                    call, tokens = "forward" if msg.forward_only else "forward_backward", sum(len(d.tokens) // 4 for d in msg.data)
                    reported = msgspec.msgpack.decode(fut.payload, type=_Reported).present()
                else:  # no tokens, but trainer time; and the step's grad norm, for the console
                    call, tokens = "optim_step", 0
                    reported = msgspec.json.decode(fut.payload, type=_Reported).present()
                usage = UsageRecord(at=time.time(), owner=rec.owner, kind="training", tokens=tokens,
                                    seconds=time.perf_counter() - started, base_model=rec.base_model, session_id=rec.session_id,
                                    model_id=rec.model_id, request_id=msg.request_id, call=call, seq_id=msg.seq_id, metrics=reported)  # fmt: skip
            except Exception as e:  # never fail (or redo) applied work over its accounting
                log.warning("usage_record_failed", request_id=msg.request_id, error=repr(e))
            else:
                if usage_after is not None:
                    usage_after.append(usage)
                else:
                    await self._publish_usage(usage)
        return fut

    async def _publish_usage(self, usage: UsageRecord) -> None:
        """Publish a billing usage record (read back deduplicated by request id); never raises."""
        try:
            await self.bus.publish(subjects.usage(usage.owner), usage, msg_id=f"usage-{usage.request_id}")
        except Exception as e:  # never fail (or redo) applied work over its accounting
            log.warning("usage_record_failed", request_id=usage.request_id, error=repr(e))

    async def _save(self, msg: SaveWeights, rec: ModelRecord) -> Future:
        """Store the model's state as of this seq_id in the object store, then record where it is.

        The object name is a function of (model, seq_id, kind), so a replayed or redelivered
        save writes the same object again and is not mistaken for a second save of the name.
        """
        kind_name = {"sampler": "SaveWeightsForSampler", "state": "SaveWeights", "external": "SaveWeightsExternal"}[msg.kind]
        base = dict(request_id=msg.request_id, owner=rec.owner, request_type=kind_name)
        try:
            segment = paths.SEGMENT_OF_KIND[msg.kind]
            path = paths.make(rec.model_id, segment, msg.name) if msg.name else None
            if path is None and msg.kind != "sampler":
                raise InvalidRequest(f"{kind_name} needs a name")
            if path is not None:
                existing = await self.bus.kv_get(self.bus.weights, path, WeightsRecord)
                if existing is not None and not msg.overwrite and (existing.model_id, existing.seq_id) != (rec.model_id, msg.seq_id):
                    raise InvalidRequest(f"{path} already exists; save under a new name")
            obj = paths.checkpoint_object(rec.model_id, msg.seq_id, msg.kind)
            files: list[str] = []
            if msg.kind == "sampler":
                blob = await self._run(weights.adapter_bytes, self.engine, rec.model_id, key=rec.owner)
                await objects.put(self.bus.objects, obj, blob)
                size = len(blob)
                # Samplers that served this model fetch the new version now (core NATS: a lost
                # notice loses only that head start), while the client's future and its sample
                # request are still on their way.
                notice = AdapterStored(model_id=rec.model_id, object=obj, size_bytes=size)
                await self.bus.nc.publish(subjects.adapter_stored(rec.base_model), encode(notice))
            elif msg.kind == "state":
                blob = await self._run(lambda: weights.state_bytes(self.engine, rec.model_id, with_optimizer=True), key=rec.owner)
                await objects.put(self.bus.objects, obj, blob)
                size = len(blob)
            else:
                folder = await self._run(self.engine.peft_files, rec.model_id, key=rec.owner)
                for name, data in folder.items():
                    await objects.put(self.bus.objects, f"{obj}/{name}", data)
                files, size = sorted(folder), sum(len(d) for d in folder.values())
            if path is None:
                result = {"sampling_session_id": msg.sampler_id, "type": "save_weights_for_sampler"}
            else:
                now = time.time()
                record = WeightsRecord(
                    path=path, owner=rec.owner, model_id=rec.model_id, base_model=rec.base_model, kind=msg.kind,
                    name=msg.name, object=obj, lora=rec.lora, seq_id=msg.seq_id, size_bytes=size, created_at=now,
                    expires_at=now + msg.ttl_s if msg.ttl_s else None, files=files, user_metadata=msg.user_metadata,
                )  # fmt: skip
                await self.bus.kv_put(self.bus.weights, path, record)
                # Overwritten: free the old bytes (not an adapter: a sampling client may still read it).
                if existing is not None and existing.object != obj and msg.kind != "sampler":
                    for name in [f"{existing.object}/{f}" for f in existing.files] or [existing.object]:
                        await objects.delete(self.bus.objects, name)
                result = {"path": path, "type": {"sampler": "save_weights_for_sampler", "state": "save_weights", "external": "save_weights_external"}[msg.kind]}
                if msg.kind == "external":
                    result["size_bytes"] = size
            log.info("weights_saved", model_id=rec.model_id, seq_id=msg.seq_id, kind=msg.kind, object=obj, bytes=size, path=path)
            return Future(state="done", payload=msgspec.json.encode(result), finished_at=time.time(), **base)
        except InvalidRequest as e:
            return Future(state="failed", error=str(e), category="user", finished_at=time.time(), **base)

    async def _load(self, msg: LoadWeights, rec: ModelRecord) -> Future:
        """load_state in sequence: the checkpoint replaces the weights (and the optimizer)."""
        base = dict(request_id=msg.request_id, owner=rec.owner, request_type="LoadWeights")
        try:
            await self._import(rec.model_id, msg.object, msg.with_optimizer, key=rec.owner)
            result = {"path": msg.path, "type": "load_weights"}
            return Future(state="done", payload=msgspec.json.encode(result), finished_at=time.time(), **base)
        except InvalidRequest as e:
            return Future(state="failed", error=str(e), category="user", finished_at=time.time(), **base)

    async def _import(self, model_id: str, obj: str, with_optimizer: bool, key: str = "") -> None:
        blob = await recovery.checkpoint_blob(self.bus, obj)
        tensors, meta = await self._run(weights.read_state, blob, key=key)
        await self._run(lambda: self.engine.import_state(model_id, tensors, meta, with_optimizer=with_optimizer), key=key)

    # -- tenants

    async def tenant(self, model_id: str) -> Tenant | None:
        t = self.tenants.get(model_id)
        if t is not None:
            return t
        async with self._locks.setdefault(model_id, asyncio.Lock()):
            t = self.tenants.get(model_id)
            if t is None:
                t = await self._hydrate(model_id)
                if t is not None:
                    self.tenants[model_id] = t
            return t

    async def _hydrate(self, model_id: str) -> Tenant | None:
        rec = await self.bus.kv_get(self.bus.models, model_id, ModelRecord)
        if rec is None:
            return None
        started = time.monotonic()
        fresh = not self.engine.has(model_id)
        if fresh:
            await self._run(self.engine.create, model_id, rec.lora, key=rec.owner)
        seq = 1
        restored = False
        snap = await recovery.newest_snapshot(self.bus, model_id)
        if snap is not None:
            try:
                await self._import(model_id, snap.object, with_optimizer=True, key=rec.owner)
                seq = snap.seq_id + 1
                restored = True
            except InvalidRequest as e:  # unreadable: the full log rebuilds it, unless purged (below)
                log.warning("snapshot_unusable", model_id=model_id, seq_id=snap.seq_id, error=str(e))
        # Create-via-load: the checkpoint is seq 0, needed only when no snapshot is (a model
        # snapshots its seq 0 when it is created, so the checkpoint may be deleted later).
        if fresh and not restored and rec.init_state is not None:
            try:
                await self._import(model_id, rec.init_state, rec.init_with_optimizer, key=rec.owner)
            except InvalidRequest:
                await self._run(self.engine.drop, model_id)
                raise
        entries, after = await recovery.read_log(self.bus, rec)
        if snap is not None and snap.seq_id > 0 and not restored and 1 not in entries:
            # The log below the snapshot was purged: replaying what is left would build another state.
            if fresh:
                await self._run(self.engine.drop, model_id)
            raise RuntimeError(f"model {model_id} cannot be rebuilt: its snapshot at seq_id {snap.seq_id} is unreadable and the log below it was purged")
        first = seq
        finished = 0
        while seq in entries:
            msg = entries[seq][1]
            stored = await self.bus.kv_get(self.bus.futures, msg.request_id, Future)
            if stored is not None and stored.state == "failed" and (stored.error or "").startswith((DEAD_LETTERED, TOO_FAR_AHEAD)):
                msg = Rejected(request_id=msg.request_id, model_id=model_id, seq_id=seq, error=stored.error, category="server")
            fut = await self._step(msg, rec)
            self._remember(fut)
            if stored is not None and stored.state == "pending":
                # Logged but never applied (or applied and the result lost with the old
                # owner): this is its first result. Its message, redelivered, is a duplicate.
                await self.bus.finish_future(fut)
                finished += 1
            seq += 1
        log.info("model_loaded", model_id=model_id, snapshot=first - 1, replayed=seq - first, finished=finished, seconds=round(time.monotonic() - started, 3))
        unapplied = [stream_seq for seq_id, (stream_seq, _) in entries.items() if seq_id >= seq]
        # Refused as too far ahead by the previous owner: acked, so never delivered again; skip them.
        refused = set()
        for seq_id, (_, msg) in entries.items():
            if seq_id > seq:
                stored = await self.bus.kv_get(self.bus.futures, msg.request_id, Future)
                if stored is not None and stored.state == "failed" and (stored.error or "").startswith(TOO_FAR_AHEAD):
                    refused.add(seq_id)
        # The same bound as _refuse_ahead (the nearest ones, as the previous owner kept them).
        refused = set(sorted(s for s in refused if s - seq <= 2 * self.cfg.max_seq_ahead)[: max(self.cfg.max_seq_ahead, 0)])
        return Tenant(
            model_id=model_id, owner=rec.owner, next_seq=seq, turn=asyncio.Condition(), record=rec,
            first_unapplied=min(unapplied) if unapplied else (after if entries else None), refused=refused,
        )  # fmt: skip

    # -- handlers

    async def on_create(self, msg: CreateModel) -> None:
        """Place a new model (any trainer of the base model may get this message): write its
        lease for the least loaded live trainer. The owner, this one or another, picks the
        lease up, builds the model and finishes the create future (`_acquire`)."""
        lease = await self.leases.place(msg.model_id)
        if lease.failed is not None:  # a retried create of a model that could not be built
            rec = await self.bus.kv_get(self.bus.models, msg.model_id, ModelRecord)
            if rec is not None:
                await self._finish_create(rec, error=lease.failed)
        elif lease.owner == self.worker_id:
            await self._acquire(msg.model_id)
        log.info("model_placed", model_id=msg.model_id, owner=lease.owner, rank=msg.lora.rank)

    async def on_train(self, msg: TrainRequest) -> None:
        if msg.model_id not in self.held:  # released (the lease moved) meanwhile
            raise Unavailable(f"model {msg.model_id} is not held here")
        t = await self.tenant(msg.model_id)  # built on first use after a restart or takeover
        if t is None:  # the gateway checks this; a hand-published message might not
            raise InvalidRequest(f"unknown model {msg.model_id}")
        ahead = msg.seq_id - t.next_seq
        if ahead > self.cfg.max_seq_ahead:
            return await self._refuse_ahead(msg, t)
        size = held_size(msg) if ahead > 0 else 0  # the next request is always taken
        if size and (t.held_bytes + size > self.cfg.max_held_bytes_per_model or self._held_bytes + size > self.cfg.max_held_bytes):
            raise Unavailable(
                f"model {msg.model_id}: waiting requests hold {t.held_bytes} bytes (all models: {self._held_bytes}); "
                f"seq_id {msg.seq_id} comes again later"
            )
        t.held_bytes += size
        self._held_bytes += size
        try:
            await self._in_turn(msg, t)
        finally:
            t.held_bytes -= size
            self._held_bytes -= size

    async def _refuse_ahead(self, msg: TrainRequest, t: Tenant) -> None:
        """Too far ahead of the model's next seq_id to be held: its future fails now (a user
        error), the message is acked, and its seq_id is skipped when the sequence gets there."""
        error = (
            f"{TOO_FAR_AHEAD}: seq_id {msg.seq_id} is {msg.seq_id - t.next_seq} past the model's next seq_id "
            f"{t.next_seq}; at most {self.cfg.max_seq_ahead} may wait. Send a model's requests in order"
        )
        if msg.seq_id - t.next_seq <= 2 * self.cfg.max_seq_ahead and len(t.refused) < self.cfg.max_seq_ahead:
            t.refused.add(msg.seq_id)  # bounded: at most the window (Tenant.refused)
        await self.bus.finish_future(_failed(msg, t.owner, error, "user"))
        log.warning("train_refused_ahead", model_id=msg.model_id, seq_id=msg.seq_id, next_seq=t.next_seq)

    async def _in_turn(self, msg: TrainRequest, t: Tenant) -> None:
        received = time.perf_counter()
        async with t.turn:
            await t.turn.wait_for(lambda: t.next_seq >= msg.seq_id)
            if msg.model_id not in self.held:
                raise Unavailable(f"model {msg.model_id} was released")
            if msg.seq_id < t.next_seq:
                return await self._resend(msg)
            started = time.perf_counter()
            usage: list[UsageRecord] = []
            fut = await self._step(msg, t.record, usage)
            t.next_seq += 1  # state and counter move together, before any await that may fail
            t.skip_refused()
            t.since_snapshot += 1
            snapshot, purge_below = None, None
            # Only right after a successful optim_step: no gradients pending, which a snapshot
            # would not hold. Exported while this model's turn is still held, and so is the log
            # position it covers (nothing past this seq_id is applied yet).
            if isinstance(msg, OptimStep) and fut.state == "done" and 0 < self.cfg.snapshot_every <= t.since_snapshot:
                snapshot = await self._run(lambda: weights.state_bytes(self.engine, msg.model_id, with_optimizer=True), key=t.owner)
                t.since_snapshot = 0
                purge_below = await recovery.applied_below(self.bus, t.record)
            t.turn.notify_all()
        computed = time.perf_counter()
        self._remember(fut)
        try:
            await self.bus.finish_future(fut)
        finally:  # accounting after the result: it never delays the caller (as the sampler does)
            for u in usage:
                await self._publish_usage(u)
        if snapshot is not None and await recovery.store_snapshot(self.bus, msg.model_id, msg.seq_id, snapshot) and purge_below:
            await recovery.purge_log(self.bus, t.record, purge_below)
        log.debug(
            "train_applied",
            model_id=msg.model_id,
            seq_id=msg.seq_id,
            type=type(msg).__name__,
            state=fut.state,
            wait_ms=round((started - received) * 1000, 2),
            compute_ms=round((computed - started) * 1000, 2),
            finish_ms=round((time.perf_counter() - computed) * 1000, 2),
        )

    async def on_dead_train(self, msg: TrainRequest, reason: str) -> None:
        """A dead-lettered training request fails where it stands in the sequence (no gap, no
        effect). Its future is failed first: a rebuild replaying the log skips it then."""
        await self.bus.fail_dead(msg.request_id, type(msg).__name__, reason)
        try:
            await self.on_train(Rejected(request_id=msg.request_id, model_id=msg.model_id, seq_id=msg.seq_id, error=f"{DEAD_LETTERED}: {reason}", category="server"))
        except Unavailable:
            pass  # not held here any more: the owner's rebuild skips it (its future says so)

    async def _resend(self, msg: TrainRequest) -> None:
        """A duplicate delivery: make sure its result reached KV (the first write may be lost)."""
        fut = self._recent.get(msg.request_id)
        if fut is None:
            return
        stored = await self.bus.kv_get(self.bus.futures, msg.request_id, Future)
        if stored is None or stored.state == "pending":
            await self.bus.finish_future(fut)

    def _remember(self, fut: Future) -> None:
        self._recent[fut.request_id] = fut
        while len(self._recent) > 256:
            self._recent.popitem(last=False)

    async def _acquire(self, model_id: str) -> None:
        """Start consuming the model's training requests. A new model (its create future still
        pending) is built now and its create future finished; one taken over or held before a
        restart is rebuilt (snapshot + log) when its next request arrives (`on_train`)."""
        async with self._locks.setdefault(f"own:{model_id}", asyncio.Lock()):
            if model_id in self.held:
                return
            rec = await self.bus.kv_get(self.bus.models, model_id, ModelRecord)
            if rec is None:
                log.error("lease_without_model_record", model_id=model_id)
                return
            stored = await self.bus.kv_get(self.bus.futures, rec.create_request_id, Future)
            if stored is not None and stored.state == "pending":
                try:
                    await self.tenant(model_id)
                except InvalidRequest as e:  # create-via-load of a checkpoint that does not fit
                    await self._finish_create(rec, error=str(e))
                    await self.leases.mark_failed(model_id, str(e))
                    return
                if rec.init_state is not None:
                    # Its own seq-0 snapshot, so that its recovery never needs the checkpoint
                    # it was loaded from (whose owner may delete it).
                    blob = await self._run(lambda: weights.state_bytes(self.engine, model_id, with_optimizer=True))
                    await recovery.store_snapshot(self.bus, model_id, 0, blob)
                await self._finish_create(rec)
            stop = asyncio.Event()
            task = asyncio.create_task(self._consume_model(rec, stop), name=f"train:{model_id}")
            self.held[model_id] = Held(stop=stop, task=task)
            log.info("model_acquired", model_id=model_id, built=model_id in self.tenants, held=len(self.held))

    async def _consume_model(self, rec: ModelRecord, stop: asyncio.Event) -> None:
        t = self.tenants.get(rec.model_id)
        await self.bus.consume(
            stream=subjects.TRAIN_STREAM,
            durable=subjects.train_consumer(rec.base_model, rec.model_id),
            filter_subject=subjects.train(rec.base_model, rec.model_id),
            type_=TrainRequest,
            handle=self.on_train,
            on_dead=self.on_dead_train,
            max_deliver=self.cfg.max_deliver,
            ack_wait_s=self.cfg.ack_wait_s,
            max_inflight=256,
            stop=stop,
            # Only used if the durable does not exist (a new model, or one idle past
            # consumer_idle_s): skip what the build above already applied.
            start_seq=t.first_unapplied if t is not None else None,
            inactive_threshold_s=self.cfg.consumer_idle_s,
            fetch_timeout_s=5.0,  # a fetch returns as soon as a message arrives; idle models poll slowly
        )

    async def _finish_create(self, rec: ModelRecord, error: str | None = None) -> None:
        """The create (or create-via-load) future, if still pending: done, or failed with `error`."""
        stored = await self.bus.kv_get(self.bus.futures, rec.create_request_id, Future)
        if stored is None:
            return
        if stored.state != "pending":  # finished before: announced again, in case its trainer died in between
            await self.bus.announce_finished(rec.create_request_id, encode(stored))
            return
        init = rec.init_state is not None
        base = dict(request_id=rec.create_request_id, owner=rec.owner, request_type="LoadWeights" if init else "CreateModel", finished_at=time.time())
        if error is not None:
            fut = Future(state="failed", error=error, category="user", **base)
        else:
            result = {"type": "load_weights", "model_id": rec.model_id, "path": rec.init_path} if init else {"type": "create_model", "model_id": rec.model_id}
            fut = Future(state="done", payload=msgspec.json.encode(result), **base)
        await self.bus.finish_future(fut)

    async def _release(self, model_id: str) -> None:
        """Stop consuming a model and forget it (its lease now names another trainer)."""
        held = self.held.pop(model_id, None)
        if held is None:
            return
        held.stop.set()
        held.task.cancel()
        await asyncio.gather(held.task, return_exceptions=True)
        self.tenants.pop(model_id, None)
        if self.engine.has(model_id):
            await self._run(self.engine.drop, model_id)
        log.warning("model_released", model_id=model_id, held=len(self.held))

    def _reconcile(self, model_id: str) -> None:
        """Make what this process holds agree with the lease (without blocking the caller)."""
        mine = self.leases.mine(model_id)
        if mine and model_id not in self.held and model_id not in self._acquiring:
            task = asyncio.create_task(self._acquire(model_id), context=contextvars.Context())  # not the caller's trace id
            self._acquiring[model_id] = task
            task.add_done_callback(lambda _: self._acquiring.pop(model_id, None))
        elif not mine and model_id in self.held:
            asyncio.create_task(self._release(model_id))

    async def _check_leases(self) -> None:
        """Take over the models of dead trainers (each goes to the least loaded live trainer,
        computed the same way by every trainer, so they do not race for the same model)."""
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.cfg.lease_check_s)
                return
            except asyncio.TimeoutError:
                pass
            try:
                live = await self.leases.live_trainers()
                load = {w: n for w, n in self.leases.counts().items() if w in live}
                for model_id in self.leases.orphans(live):
                    heir = least_loaded(live, load)
                    load[heir] = load.get(heir, 0) + 1
                    if heir == self.worker_id and await self.leases.take_over(model_id):
                        self._reconcile(model_id)
                for model_id in list(self.leases.by_model):
                    self._reconcile(model_id)  # a missed watch event, a failed acquire
            except Exception as e:
                log.warning("lease_check_failed", error=repr(e))

    # -- the process

    def info(self) -> WorkerInfo:
        now = time.time()
        base = self.engine.info
        return WorkerInfo(
            worker_id=self.worker_id,
            kind="trainer",
            host=socket.gethostname(),
            pid=os.getpid(),
            base_model=self.cfg.base_model,
            model_name=self.cfg.base_model,
            tokenizer_id=self.cfg.tokenizer_id or self.cfg.base_model,
            arch=base.arch,
            vocab_size=base.vocab_size,
            max_context=base.max_context,
            lora_alpha=base.lora_alpha,
            lora_targets=list(base.lora_targets),
            device=base.device,
            started_at=self._started,
            heartbeat_at=now,
            busy_fraction=min(1.0, self._compute.busy_s / max(now - self._started, 1e-9)),
            models=len(self.tenants),
            ranks=getattr(self.engine, "world", 1),
        )

    async def run(self, stop: asyncio.Event) -> None:
        base = self.cfg.base_model
        self._stop = stop
        log.info("trainer_ready", worker_id=self.worker_id, base_model=base, device=self.engine.info.device)
        try:  # the single shared train consumer of versions before leases: unused now
            await self.bus.js.delete_consumer(subjects.TRAIN_STREAM, subjects.trainer_consumer(base))
        except NotFoundError:
            pass
        # The heartbeat outlives `stop` until the models are handed over: while it beats, no
        # other trainer takes them over on its own (and consumes beside this one).
        beating = asyncio.Event()
        heartbeat = asyncio.create_task(self.bus.heartbeat(self.worker_id, self.info, self.cfg.heartbeat_s, beating))
        try:
            await asyncio.gather(
                self.bus.consume(
                    stream=subjects.CREATE_STREAM,
                    durable=subjects.trainer_consumer(base),
                    filter_subject=subjects.create(base),
                    type_=CreateModel,
                    handle=self.on_create,
                    on_dead=lambda msg, reason: self.bus.fail_dead(msg.request_id, "CreateModel", reason),
                    stop=stop,
                ),
                self.leases.watch(self._stop),
                self._check_leases(),
                self._keep_group_alive(stop),
            )
        finally:
            try:
                await self._hand_over()
            finally:
                beating.set()
                await asyncio.gather(heartbeat, return_exceptions=True)
                self._pool.shutdown(wait=False, cancel_futures=True)

    async def _keep_group_alive(self, stop: asyncio.Event) -> None:
        """A trainer group's idle ranks wait in a collective for rank 0's next call: give them
        one now and then (GroupEngine.keepalive sends it only after a quiet spell)."""
        keepalive = getattr(self.engine, "keepalive", None)
        while keepalive is not None and not stop.is_set():
            await self._run(keepalive)
            try:
                await asyncio.wait_for(stop.wait(), timeout=5.0)
            except TimeoutError:
                pass

    async def _hand_over(self) -> None:
        """Shutting down: stop consuming every model (unfinished requests are handed back with
        a nak), then move each model's lease to the least loaded other live trainer by
        compare-and-set, so it takes the model now rather than after the heartbeat TTL. A lease
        that moved meanwhile is left alone; with no other trainer, leases stay (a restart with
        the same worker id takes its models straight back)."""
        for task in list(self._acquiring.values()):
            task.cancel()
        for held in self.held.values():
            held.stop.set()
            held.task.cancel()
        await asyncio.gather(*(h.task for h in self.held.values()), *self._acquiring.values(), return_exceptions=True)
        models = sorted(self.held)
        self.held.clear()
        if models:
            await self.leases.hand_over(models)

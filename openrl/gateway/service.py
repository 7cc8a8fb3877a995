"""The gateway's service: the Tinker HTTP protocol in front of the bus.

Stateless: every fact it needs (sessions, models, futures, live workers) is in JetStream,
so any replica answers any request, and a restarted gateway answers the same client.
It validates and authenticates, turns a Tinker call into a bus message with a
deterministic request id, and long-polls results. It never imports torch.

`Gateway` also holds the lookups every route module shares (`owner`, `session`, `model`,
`workers`, `accept`); `app.make_app` puts it together with the other route modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from aiohttp import web

from openrl.bus import paths, subjects
from openrl.bus.client import MAX_PAYLOAD, Bus
from openrl.bus.errors import InvalidRequest, NotFound, Unauthorized, Unavailable
from openrl.bus.sampling import check_params
from openrl.bus.messages import (
    CreateModel,
    ForwardBackwardResult,
    LoadWeights,
    Future,
    MAX_NUM_SAMPLES,
    MAX_TOPK,
    LoraSpec,
    ModelRecord,
    OptimStep,
    Rejected,
    SampleRequest,
    SampleResult,
    SamplerRecord,
    SamplingParams,
    SaveWeights,
    SessionRecord,
    Tensor,
    WeightsRecord,
    WorkerInfo,
    decode,
)
from openrl.gateway import audit, auth, bounds, names, wire
from openrl.gateway.bodies import (
    ASampleBody,
    Int,
    CreateModelBody,
    CreateSamplingSessionBody,
    CreateSessionBody,
    FinishBody,
    LoadBody,
    LoraConfig,
    ModelBody,
    OptimStepBody,
    RetrieveBody,
    SaveForSamplerBody,
    SaveNamedBody,
    SessionBody,
)
from openrl.gateway.admission import Admission, AdmissionConfig, Slot
from openrl.gateway.futures import Waiters
from openrl.gateway.progress import Progress, TooFarAhead
from openrl.gateway.quotas import Quotas, Usage
from openrl.gateway.http import API, InvalidToken, check_ttl, key_id, read_body, reply, request_id

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    nats_url: str = "nats://127.0.0.1:4222"
    api_keys: tuple[str, ...] = ()
    long_poll_s: float = 25.0  # below the SDK's 45 s read timeout on retrieve_future
    max_body_bytes: int = MAX_PAYLOAD - 256 * 1024  # headroom for the bus envelope
    fwdbwd_max_chunk_len: int = 1024
    proto_compress_fwdbwd: bool = False
    sample_queue_max: int = 4096  # sample requests waiting for a sampler; above it, 429
    max_seq_ahead: int = 1024  # the trainers' window: a training request further ahead is a 429 (progress.py)
    jwt_auth: bool = False  # tell clients to trade their key for a JWT (auth.py); whoami needs it
    # Sampler retention (catalogue.collect_samplers_once, docs/storage.md): the newest this many
    # unnamed sampler weights of each model are kept; the sweep runs this often; an unreferenced
    # adapter is deleted after it has stayed unreferenced this long.
    sampler_weights_keep: int = 8
    collect_every_s: float = 30.0
    collect_grace_s: float = 60.0
    quotas: Quotas = Quotas()  # what one key may hold (quotas.py, docs/limits.md)
    admission: AdmissionConfig = AdmissionConfig()  # a key far above its share waits (admission.py, docs/limits.md)
    client_config_extra: dict[str, Any] = field(default_factory=dict)


class _Place(msgspec.Struct):
    """Where a sequenced request stands, read from a body that failed to decode in full."""

    model_id: str
    seq_id: Int


def sample_fields(body: ASampleBody) -> dict[str, Any]:
    """The SampleRequest fields of an asample body, checked for what needs no model. Sizes
    first: nothing is built for a request past a bound (docs/limits.md)."""
    if not 1 <= body.num_samples <= MAX_NUM_SAMPLES:
        raise InvalidRequest(f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {body.num_samples}")
    for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
        k = getattr(body, name)
        if not 0 <= k <= MAX_TOPK:
            raise InvalidRequest(f"{name} must be in [0, {MAX_TOPK}], got {k}")
    n_prompt = sum(len(chunk.tokens) for chunk in body.prompt.chunks)
    if body.target_prompt_logprobs is not None:
        _check_target(body.target_prompt_logprobs, n_prompt)
    tokens: list[int] = []
    for chunk in body.prompt.chunks:
        if chunk.type != "encoded_text":
            raise InvalidRequest(f"prompt: {chunk.type} chunks are not supported; this server serves text-only models")
        tokens += chunk.tokens
    if not tokens:
        raise InvalidRequest("prompt is empty")
    if len(tokens) > bounds.MAX_PROMPT_TOKENS:  # (bounds.prompt_size refused most such bodies before decoding)
        raise InvalidRequest(f"prompt: {len(tokens)} tokens; a prompt may hold at most {bounds.MAX_PROMPT_TOKENS}")
    if any(not -(2**31) <= t < 2**31 for t in tokens):
        raise InvalidRequest("prompt: token ids must fit in int32")
    params = body.sampling_params
    stop = params.stop
    stop_strings: list[str] = []
    stop_ids: list[int] = []
    if isinstance(stop, str):
        stop_strings = [stop]
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
        stop_strings = stop
    elif isinstance(stop, list) and all(isinstance(x, int) and not isinstance(x, bool) and -(2**31) <= x < 2**31 for x in stop):
        stop_ids = stop
    elif stop is not None:
        raise InvalidRequest("sampling_params.stop must be a string, a list of strings or a list of int32 token ids")
    sampling = SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        stop_strings=stop_strings,
        stop_token_ids=stop_ids,
        stop_at_eos=not (isinstance(stop, list) and not stop),
    )
    check_params(sampling)  # the sampler checks the same again, with its model's limits
    target = None
    if body.target_prompt_logprobs is not None:
        t = body.target_prompt_logprobs
        if t.dtype != "int64":
            raise InvalidRequest(f"target_prompt_logprobs must be int64, got {t.dtype}")
        target = Tensor(
            dtype="int64",
            data=struct.pack(f"<{len(t.data)}q", *t.data),
            shape=list(t.shape or [len(t.data)]),
            crow=None if t.sparse_crow_indices is None else struct.pack(f"<{len(t.sparse_crow_indices)}q", *t.sparse_crow_indices),
            col=None if t.sparse_col_indices is None else struct.pack(f"<{len(t.sparse_col_indices)}q", *t.sparse_col_indices),
        )
    return dict(
        prompt=struct.pack(f"<{len(tokens)}i", *tokens),
        num_samples=body.num_samples,
        sampling=sampling,
        prompt_logprobs=bool(body.prompt_logprobs),
        prompt_logprobs_last_n=body.prompt_logprobs_last_n,
        topk_prompt_logprobs=body.topk_prompt_logprobs,
        topk_sample_logprobs=body.topk_sample_logprobs,
        target_prompt_logprobs=target,
        prompt_alt_tokens_k=body.prompt_alt_tokens_k,
    )


def _check_target(t, n_prompt: int) -> None:
    """target_prompt_logprobs: a [len(prompt) - 1, K] int64 tensor, dense or CSR, bounded
    as the dense array the sampler makes of it, before any of it is packed."""
    where = "target_prompt_logprobs"
    if t.dtype != "int64":
        raise InvalidRequest(f"{where} must be int64, got {t.dtype}")
    shape = list(t.shape) if t.shape else [len(t.data)]
    if len(shape) != 2 or shape[0] != n_prompt - 1:
        raise InvalidRequest(f"{where} must be a [len(prompt) - 1, K] = [{n_prompt - 1}, K] tensor, got shape {shape}")
    elements = bounds.tensor_elements(shape, where)
    sparse = t.sparse_crow_indices is not None or t.sparse_col_indices is not None
    if not sparse and len(t.data) != elements:
        raise InvalidRequest(f"{where}: shape {shape} does not match {len(t.data)} values")
    if sparse:
        crow, col = t.sparse_crow_indices, t.sparse_col_indices
        if crow is None or col is None or len(crow) != shape[0] + 1 or len(col) != len(t.data) or len(t.data) > elements:
            raise InvalidRequest(f"{where}: CSR needs {shape[0] + 1} crow indices and one column index per value, at most rows x columns values")


# -- the service -----------------------------------------------------------------------


class Gateway:
    def __init__(self, cfg: GatewayConfig, bus: Bus):
        self.cfg = cfg
        self.bus = bus
        self.keys = {key_id(k) for k in cfg.api_keys}
        self.live_keys: set[str] = set()  # ids of the keys made with `openrl keys`, kept current by keys.watch
        self.jwt_secret: bytes | None = None  # loaded at startup by auth.attach
        self.usage = Usage(bus, cfg.quotas)  # what each key holds, for the quota checks (quotas.attach starts it)
        self.admission = Admission(cfg.admission)  # a key holding far more in flight than an active other waits
        self.waiters = Waiters(bus, on_finished=self._finished)  # done notices end what usage and admission count in flight
        self.progress = Progress(bus, cfg.max_seq_ahead)  # far-ahead training requests refused before the log
        self._workers: tuple[float, list[WorkerInfo]] = (0.0, [])
        self._backlog: tuple[float, int] = (0.0, 0)

    def _finished(self, request_id: str) -> None:
        self.usage.finished(request_id)
        self.admission.finished(request_id)

    async def _pending(self, request_id: str) -> bool:
        return await self.bus.pending_future(request_id) is not None

    # -- auth and lookups

    def owner(self, request: web.Request) -> str:
        key = request.headers.get("X-API-Key", "")
        if not key:
            raise Unauthorized("missing X-API-Key header")
        if key.startswith("eyJ"):  # a JWT from auth/token: its key must still be live
            kid = auth.verify(key, self.jwt_secret)
            if kid not in self.keys and kid not in self.live_keys:
                raise InvalidToken("this JWT's API key is revoked or unknown")
            return kid
        kid = key_id(key)
        if kid not in self.keys and kid not in self.live_keys:
            raise Unauthorized("unknown API key")
        return kid

    async def _owned(self, kv, key: str, type_: type, owner: str, what: str):
        """The record under `key` if `owner` owns it; another key's record looks absent. A key
        that cannot be one of ours (NATS would refuse it: a trailing '.', a space, a wildcard)
        is a 400 before the bus sees it."""
        names.check_id(key, what)
        rec = await self.bus.kv_get(kv, key, type_)
        if rec is None or rec.owner != owner:
            raise NotFound(f"unknown {what} {key!r}")
        return rec

    async def session(self, session_id: str, owner: str) -> SessionRecord:
        return await self._owned(self.bus.sessions, session_id, SessionRecord, owner, "session")

    async def model(self, model_id: str, owner: str, *, trainable: bool = True) -> ModelRecord:
        # A model record is created once and never changed or deleted (the bucket has no TTL):
        # the quota watch's copy of the bucket (usage.models) answers without a KV round trip
        # on every request. A model too new for the watch to have seen is read from KV.
        names.check_id(model_id, "model_id")
        rec = self.usage.models.get(subjects.kv_key(model_id))
        if rec is None:
            rec = await self._owned(self.bus.models, model_id, ModelRecord, owner, "model_id")
        elif rec.owner != owner:  # another key's model looks absent, as _owned answers it
            raise NotFound(f"unknown model_id {model_id!r}")
        if trainable and rec.copy_of:  # a run copy_weights made to hold a copy: read-only
            raise InvalidRequest(f"{model_id} holds a copy of {rec.copy_of} and cannot be trained; load it with create_training_client_from_state")
        return rec

    async def workers(self) -> list[WorkerInfo]:
        """Live workers (heartbeats in KV), cached for a second."""
        at, cached = self._workers
        if time.monotonic() - at < 1.0:
            return cached
        found = []
        keys = await self.bus.kv_keys(self.bus.workers)
        for k in keys:
            info = await self.bus.kv_get(self.bus.workers, k, WorkerInfo)
            if info is not None and time.time() - info.heartbeat_at < 15:
                found.append(info)
        self._workers = (time.monotonic(), found)
        return found

    async def worker_for(self, base_model: str, kind: str | None = None) -> WorkerInfo:
        """A live worker (of `kind`, or any) serving `base_model`, by its name or its path."""
        workers = [w for w in await self.workers() if w.kind == kind or (kind is None and w.kind != "rewarder")]
        for w in workers:
            if base_model in (w.base_model, w.model_name):
                return w
        served = sorted({w.model_name or w.base_model for w in workers})
        if not served:
            raise Unavailable(f"no {kind or 'worker'} is running yet; retry shortly")
        raise InvalidRequest(f"base model {base_model!r} is not served here; available: {served}")

    async def trainer_for(self, base_model: str) -> WorkerInfo:
        return await self.worker_for(base_model, "trainer")

    async def accept(self, rid: str, owner: str, request_type: str) -> bool:
        """Record a pending future; False when this request id was accepted before."""
        fut = Future(request_id=rid, owner=owner, request_type=request_type, created_at=time.time())
        return await self.bus.kv_create(self.bus.futures, rid, fut)

    # -- bootstrap and sessions

    async def healthz(self, request: web.Request) -> web.Response:
        workers = await self.workers()
        return reply(
            {
                "status": "ok",
                "bus": self.bus.nc.is_connected,
                "trainers": [w.worker_id for w in workers if w.kind == "trainer"],
                "samplers": [w.worker_id for w in workers if w.kind == "sampler"],
                "rewarders": [w.worker_id for w in workers if w.kind == "rewarder"],
            }
        )

    async def client_dynamic_config(self, request: web.Request) -> web.Response:
        """The flags a live SDK client re-reads every `refresh_interval_sec`. No cancel_future
        here: an abandoned sample runs to its end (its result expires with the future)."""
        return reply({"refresh_interval_sec": 300, "sample_cancel_enabled": False, "sample_cancel_max_batch_size": 64})

    async def client_config(self, request: web.Request) -> web.Response:
        return reply(
            {
                "pjwt_auth_enabled": self.cfg.jwt_auth,
                "credential_default_source": "api_key",
                "parallel_fwdbwd_chunks": True,
                "proto_compress_fwdbwd": self.cfg.proto_compress_fwdbwd,
                "fwdbwd_max_chunk_len": self.cfg.fwdbwd_max_chunk_len,
                # A chunk must fit in one bus message after conversion.
                "fwdbwd_max_chunk_bytes_count": min(5_000_000, self.cfg.max_body_bytes // 2),
                "sample_use_retrieve_futures": False,
                "custom_loss_server_side": False,
                "sample_join_sampling_session": False,
                **self.cfg.client_config_extra,
            }
        )

    async def create_session(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        body = await read_body(request, CreateSessionBody)
        # The SDK retries create_session with one idempotency key: derive the id from it.
        idem = request.headers.get("X-Idempotency-Key") or uuid.uuid4().hex
        sid = "s-" + hashlib.blake2b(f"{owner}|{idem}".encode(), digest_size=8).hexdigest()
        rec = SessionRecord(
            session_id=sid,
            owner=owner,
            created_at=time.time(),
            tags=body.tags,
            user_metadata={str(k): str(v) for k, v in (body.user_metadata or {}).items()},
            project_id=body.project_id,
            display_name=body.display_name,
            last_heartbeat=time.time(),
        )
        if await self.bus.kv_get(self.bus.sessions, sid, SessionRecord) is None:  # a retry is never refused
            self.usage.check_session(owner)
        if await self.bus.kv_create(self.bus.sessions, sid, rec):
            self.usage.saw_session(rec)
            log.info("session_created", session_id=sid, owner=owner)
            await audit.record(self.bus, owner, "session_create", actor=owner, session_id=sid, details={"project_id": body.project_id or ""})
        return reply({"type": "create_session", "session_id": sid})

    async def session_heartbeat(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        body = await read_body(request, SessionBody)
        rec = await self.session(body.session_id, owner)
        if rec.finished_at is not None:
            return reply({"detail": f"session {rec.session_id} is finished"}, status=410)
        await self.bus.kv_put(self.bus.sessions, rec.session_id, msgspec.structs.replace(rec, last_heartbeat=time.time()))
        return reply({"type": "session_heartbeat"})

    async def finish_session(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        rec = await self.session(request.match_info["session_id"], owner)
        body = await read_body(request, FinishBody)
        if rec.finished_at is None:  # first wins
            reason = str((body.reason or {}).get("type", "success"))
            await self.bus.kv_put(
                self.bus.sessions, rec.session_id, msgspec.structs.replace(rec, finished_at=time.time(), finish_reason=reason)
            )
            log.info("session_finished", session_id=rec.session_id, reason=reason)
            await audit.record(self.bus, owner, "session_finish", actor=owner, session_id=rec.session_id, details={"reason": reason})
        return reply({})

    async def telemetry(self, request: web.Request) -> web.Response:
        self.owner(request)
        try:
            batch = msgspec.json.decode(await request.read())
            for event in batch.get("events", []) if isinstance(batch, dict) else []:
                if isinstance(event, dict) and event.get("event") in ("GENERIC_EVENT", "UNHANDLED_EXCEPTION"):
                    log.debug("client_event", name=event.get("event_name"), error=event.get("error_message"))
        except msgspec.DecodeError:
            pass  # telemetry is best effort both ways
        return reply({"status": "accepted"})

    async def server_capabilities(self, request: web.Request) -> web.Response:
        models = {}
        for w in await self.workers():
            if w.kind == "rewarder":  # serves a reward function, not a model
                continue
            name = w.model_name or w.base_model
            entry = models.setdefault(name, {"model_name": name, "max_context_length": w.max_context})
            entry["trainable" if w.kind == "trainer" else "sampleable"] = True
        return reply({"supported_models": list(models.values())})

    # -- models

    async def create_model(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        async with self.admission.admit(owner, "train") as slot:  # before the body is read
            return await self._create_model(request, owner, slot)

    async def _create_model(self, request: web.Request, owner: str, slot: Slot) -> web.Response:
        body = await read_body(request, CreateModelBody)
        session = await self.session(body.session_id, owner)
        if session.finished_at is not None:
            raise InvalidRequest(f"session {session.session_id} is finished")
        if body.model_seq_id < 0:
            raise InvalidRequest("model_seq_id must be >= 0")
        if body.optimizer_config.type != "adamw":
            raise InvalidRequest(f"optimizer {body.optimizer_config.type!r} is not supported; use adamw")
        lora = body.lora_config or LoraConfig(rank=32)
        if not 1 <= lora.rank <= 256:
            raise InvalidRequest(f"lora rank must be in [1, 256], got {lora.rank}")
        if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
            raise InvalidRequest("at least one of train_attn, train_mlp, train_unembed must be true")
        trainer = await self.trainer_for(body.base_model)
        model_id = f"{session.session_id}:train:{body.model_seq_id}"  # the SDK assumes this formula
        rid = request_id("create", model_id)
        seed = lora.seed if lora.seed is not None else int(hashlib.blake2b(model_id.encode(), digest_size=4).hexdigest(), 16)
        spec = LoraSpec(
            rank=lora.rank, seed=seed, train_unembed=lora.train_unembed, train_mlp=lora.train_mlp, train_attn=lora.train_attn
        )
        record = ModelRecord(
            model_id=model_id,
            session_id=session.session_id,
            owner=owner,
            base_model=trainer.model_name or trainer.base_model,
            lora=spec,
            created_at=time.time(),
            create_request_id=rid,
            user_metadata={str(k): str(v) for k, v in (body.user_metadata or {}).items()},
        )
        return await self._submit_create(record, owner, slot=slot)

    async def _submit_create(self, record: ModelRecord, owner: str, init_path: str = "", slot: Slot | None = None) -> web.Response:
        """Record the model once; (re)accept and (re)publish on every attempt, since a first
        attempt may have died in between. Accept and publish are idempotent by request id."""
        if await self.bus.kv_get(self.bus.models, record.model_id, ModelRecord) is None:  # a retry is never refused
            self.usage.check_model(owner)
        if await self.bus.kv_create(self.bus.models, record.model_id, record):
            self.usage.saw_model(record)
        else:
            record = await self.model(record.model_id, owner)  # a retry: the first record stands
        rid = record.create_request_id
        kind = "LoadWeights" if record.init_state else "CreateModel"
        if await self.accept(rid, owner, kind):
            if slot is not None:
                slot.track(rid)
            else:
                self.admission.count(owner, "train", rid)
        msg = CreateModel(request_id=rid, model_id=record.model_id, base_model=record.base_model, lora=record.lora, init_path=init_path)
        await self.bus.publish(subjects.create(record.base_model), msg, msg_id=rid)
        log.info("model_create_submitted", model_id=record.model_id, base_model=record.base_model, rank=record.lora.rank, init=init_path or None)
        return reply({"request_id": rid, "model_id": record.model_id})

    # -- checkpoints

    async def save_weights(self, request: web.Request) -> web.Response:
        """save_state: adapter + optimizer state, resumable (tinker://<model>/weights/<name>)."""
        return await self._save_named(request, "state", "SaveWeights")

    async def save_weights_external(self, request: web.Request) -> web.Response:
        """A standard PEFT adapter folder (tinker://<model>/external_weights/<name>)."""
        return await self._save_named(request, "external", "SaveWeightsExternal")

    async def _save_named(self, request: web.Request, kind: str, request_type: str) -> web.Response:
        owner = self.owner(request)
        body = await self._sequenced_body(request, owner, SaveNamedBody)
        rec = await self.model(body.model_id, owner)
        rid = request_id("train", rec.model_id, body.seq_id)
        async with self._in_sequence(rec, body.seq_id):
            names.check_name(body.path)
            check_ttl(body.ttl_seconds)
            self._check_checkpoint_quota(owner, paths.make(rec.model_id, paths.SEGMENT_OF_KIND[kind], body.path))
            msg = SaveWeights(
                request_id=rid, model_id=rec.model_id, seq_id=body.seq_id, kind=kind, name=body.path,
                overwrite=bool(body.overwrite), ttl_s=float(body.ttl_seconds) if body.ttl_seconds else None,
                user_metadata={str(k): str(v) for k, v in (body.user_metadata or {}).items()},
            )  # fmt: skip
            return await self._submit_train(rec, msg, owner, request_type)

    async def load_weights(self, request: web.Request) -> web.Response:
        """Two modes (spec §3.2): create-via-load (session_id + model_seq_id: a new model whose
        seq 0 is the checkpoint) or the legacy in-place load (model_id + seq_id, in sequence)."""
        owner = self.owner(request)
        body = await read_body(request, LoadBody)
        if body.model_id is not None:
            if body.seq_id is None or body.seq_id < 1:
                raise InvalidRequest("load_weights into a model needs seq_id >= 1")
            rec = await self.model(body.model_id, owner)
            # In the model's sequence from here on: a missing or foreign path, or one of another
            # base model, fails this seq_id (the next request does not wait for it forever).
            async with self._in_sequence(rec, body.seq_id):
                saved = await self.saved_weights(body.path, owner, segment="weights")
                if saved.base_model != rec.base_model:
                    raise InvalidRequest(f"{body.path} was trained on {saved.base_model}, this model is {rec.base_model}")
                rid = request_id("train", rec.model_id, body.seq_id)
                msg = LoadWeights(request_id=rid, model_id=rec.model_id, seq_id=body.seq_id, path=saved.path, object=saved.object,
                                  with_optimizer=body.optimizer)  # fmt: skip
                return await self._submit_train(rec, msg, owner, "LoadWeights")
        saved = await self.saved_weights(body.path, owner, segment="weights")
        if body.session_id is None or body.model_seq_id is None:
            raise InvalidRequest("load_weights needs model_id and seq_id, or session_id and model_seq_id")
        if body.model_seq_id < 0:
            raise InvalidRequest("model_seq_id must be >= 0")
        if body.optimizer_config is not None and body.optimizer_config.type != "adamw":
            raise InvalidRequest(f"optimizer {body.optimizer_config.type!r} is not supported; use adamw")
        session = await self.session(body.session_id, owner)
        if session.finished_at is not None:
            raise InvalidRequest(f"session {session.session_id} is finished")
        if body.base_model and body.base_model != saved.base_model:
            raise InvalidRequest(f"{body.path} was trained on {saved.base_model}, not {body.base_model}")
        await self.trainer_for(saved.base_model)
        model_id = f"{session.session_id}:train:{body.model_seq_id}"
        record = ModelRecord(
            model_id=model_id, session_id=session.session_id, owner=owner, base_model=saved.base_model, lora=saved.lora,
            created_at=time.time(), create_request_id=request_id("create", model_id),
            user_metadata={str(k): str(v) for k, v in (body.user_metadata or {}).items()},
            init_state=saved.object, init_path=saved.path, init_with_optimizer=body.optimizer,
        )  # fmt: skip
        return await self._submit_create(record, owner, init_path=saved.path)

    async def get_info(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        body = await read_body(request, ModelBody)
        rec = await self.model(body.model_id, owner)
        trainer = await self.trainer_for(rec.base_model)
        return reply(
            {
                "type": "get_info",
                "model_id": rec.model_id,
                "model_data": {"arch": trainer.arch, "model_name": rec.base_model, "tokenizer_id": trainer.tokenizer_id},
                "is_lora": True,
                "lora_rank": rec.lora.rank,
                "model_name": rec.base_model,
                "optimizer_config": {"type": "adamw"},
                # Beyond Tinker's schema (the SDK ignores extra fields): the LoRA convention.
                "lora_alpha": trainer.lora_alpha,
                "lora_target_modules": trainer.lora_targets,
            }
        )

    # -- training (ordered by seq_id per model, on the train stream)

    async def forward_backward(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        raw = await request.read()
        raw = wire.decompress(raw, request.headers.get("Content-Encoding"), self.cfg.max_body_bytes)
        parsed = wire.parse_forward_backward(raw)
        rec = await self.model(parsed.model_id, owner)
        rid = request_id("train", rec.model_id, parsed.seq_id)
        kind = "Forward" if parsed.forward_only else "ForwardBackward"
        async with self._in_sequence(rec, parsed.seq_id):
            try:
                msg = wire.to_message(parsed, rid)
            except InvalidRequest as e:
                # Bad content still takes its seq_id, so the sequence never has a gap; the
                # client learns why from the future.
                msg = Rejected(request_id=rid, model_id=rec.model_id, seq_id=parsed.seq_id, error=str(e))
            return await self._submit_train(rec, msg, owner, kind)

    async def optim_step(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        body = await self._sequenced_body(request, owner, OptimStepBody)
        rec = await self.model(body.model_id, owner)
        rid = request_id("train", rec.model_id, body.seq_id)
        if body.adam_params is None:
            kind = (body.optimizer_params or {}).get("type", "missing")
            msg = Rejected(
                request_id=rid, model_id=rec.model_id, seq_id=body.seq_id, error=f"optimizer {kind!r} is not supported; send adam_params"
            )
        else:
            msg = OptimStep(
                request_id=rid,
                model_id=rec.model_id,
                seq_id=body.seq_id,
                adam=body.adam_params,
            )
        async with self._in_sequence(rec, body.seq_id):
            return await self._submit_train(rec, msg, owner, "OptimStep")

    # -- sampling

    async def save_weights_for_sampler(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        body = await self._sequenced_body(request, owner, SaveForSamplerBody)
        rec = await self.model(body.model_id, owner)
        async with self._in_sequence(rec, body.seq_id):
            return await self._save_for_sampler(rec, body, owner)

    async def _save_for_sampler(self, rec: ModelRecord, body: SaveForSamplerBody, owner: str) -> web.Response:
        rid = request_id("train", rec.model_id, body.seq_id)
        sampler_id = ""
        if body.path:
            names.check_name(body.path)
            check_ttl(body.ttl_seconds)
            self._check_checkpoint_quota(owner, paths.make(rec.model_id, "sampler_weights", body.path))
        else:
            if body.sampling_session_seq_id is None or body.sampling_session_seq_id < 0:
                raise InvalidRequest("give either path (a name) or sampling_session_seq_id >= 0")
            sampler_id = f"{rec.session_id}:sample:{body.sampling_session_seq_id}"
            # Recorded now; the client learns the id only once the trainer has stored the weights.
            record = SamplerRecord(
                sampler_id=sampler_id, owner=owner, session_id=rec.session_id, base_model=rec.base_model,
                weights=paths.adapter_object(rec.model_id, body.seq_id), lora=rec.lora, created_at=time.time(),
            )  # fmt: skip
            await self.bus.kv_create(self.bus.samplers, sampler_id, record)
        msg = SaveWeights(
            request_id=rid, model_id=rec.model_id, seq_id=body.seq_id, kind="sampler", name=body.path or "",
            sampler_id=sampler_id, overwrite=False, ttl_s=float(body.ttl_seconds) if body.ttl_seconds else None,
        )  # fmt: skip
        return await self._submit_train(rec, msg, owner, "SaveWeightsForSampler")

    async def create_sampling_session(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        body = await read_body(request, CreateSamplingSessionBody)
        session = await self.session(body.session_id, owner)
        if body.sampling_session_seq_id < 0:
            raise InvalidRequest("sampling_session_seq_id must be >= 0")
        sampler_id = f"{session.session_id}:sample:{body.sampling_session_seq_id}"
        if body.model_path:
            saved = await self.saved_weights(body.model_path, owner)
            record = SamplerRecord(
                sampler_id=sampler_id, owner=owner, session_id=session.session_id, base_model=saved.base_model,
                model_path=saved.path, weights=saved.object, lora=saved.lora, created_at=time.time(),
            )  # fmt: skip
        elif body.base_model:
            worker = await self.worker_for(body.base_model)
            base = worker.model_name or worker.base_model
            record = SamplerRecord(sampler_id=sampler_id, owner=owner, session_id=session.session_id, base_model=base, created_at=time.time())
        else:
            raise InvalidRequest("give base_model or model_path")
        if not await self.bus.kv_create(self.bus.samplers, sampler_id, record):
            record = await self.sampler(sampler_id, owner)  # a retried create: the first one stands
        return reply({"sampling_session_id": record.sampler_id, "type": "create_sampling_session"})

    async def get_sampler(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        record = await self.sampler(request.match_info["sampler_id"], owner)
        return reply({"sampler_id": record.sampler_id, "base_model": record.base_model, "model_path": record.model_path})

    async def asample(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        async with self.admission.admit(owner, "sample") as slot:  # before the body is read
            return await self._asample(request, owner, slot)

    async def _asample(self, request: web.Request, owner: str, slot: Slot) -> web.Response:
        bounds.prompt_size(await request.read())  # a prompt's size, before its tokens become Python ints
        body = await read_body(request, ASampleBody)
        sampler = await self.sampler(body.sampling_session_id, owner)
        msg_fields = sample_fields(body)
        rid = request_id("sample", sampler.sampler_id, body.seq_id)
        if await self.sample_backlog() >= self.cfg.sample_queue_max:
            return reply({"detail": "sample queue is full; retry shortly", "type": "rate_limited"}, status=429, headers={"Retry-After": "1"})
        msg = SampleRequest(request_id=rid, sampler_id=sampler.sampler_id, base_model=sampler.base_model, weights=sampler.weights,
                            lora=sampler.lora, **msg_fields)  # fmt: skip
        bounds.encoded(msg, "sample request")
        await self.usage.check_samples(owner, rid, body.num_samples)  # 429 past the key's sequences in flight
        if await self.accept(rid, owner, "Sample"):
            slot.track(rid)
        self.usage.sampling(owner, rid, body.num_samples)
        await self.bus.publish(subjects.sample(sampler.base_model), msg, msg_id=rid)
        return reply({"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(body.num_samples)]})

    async def sample_backlog(self) -> int:
        """Sample requests not yet taken by a sampler, re-read at most every 0.25 s."""
        at, n = self._backlog
        if time.monotonic() - at > 0.25:
            info = await self.bus.js.stream_info(subjects.SAMPLE_STREAM)
            n = info.state.messages
            self._backlog = (time.monotonic(), n)
        return n

    async def sampler(self, sampler_id: str, owner: str) -> SamplerRecord:
        return await self._owned(self.bus.samplers, sampler_id, SamplerRecord, owner, "sampling session")

    async def saved_weights(self, path: str, owner: str, segment: str = "sampler_weights") -> WeightsRecord:
        parsed = paths.parse(path)
        if parsed.segment != segment:
            what = "sampling needs sampler weights" if segment == "sampler_weights" else "loading needs a saved state"
            raise InvalidRequest(f"{what} (tinker://<model>/{segment}/<name>), got {path!r}")
        rec = await self.bus.kv_get(self.bus.weights, str(parsed), WeightsRecord)
        if rec is None or (rec.owner != owner and not rec.public):  # published: anyone may read it
            raise NotFound(f"no saved weights at {path!r}")
        if rec.expires_at is not None and rec.expires_at < time.time():
            raise NotFound(f"the weights at {path!r} have expired")
        return rec

    def _check_checkpoint_quota(self, owner: str, path: str) -> None:
        """A save under a new name needs room in the key's checkpoint quota (overwriting, or a
        retried save, takes none)."""
        if subjects.kv_key(path) not in self.usage.checkpoints:
            self.usage.check_checkpoint(owner)

    @contextlib.asynccontextmanager
    async def _in_sequence(self, rec: ModelRecord, seq_id: int):
        """Once a request's model and seq_id are known, any refusal (a 4xx: bad content, a
        missing checkpoint, a quota) still takes its seq_id, as a Rejected request whose future
        holds the error: the SDK moves on to seq_id + 1, and the model's sequence must have no
        gap. Unavailable (503) is not a refusal: the client retries the same seq_id. A seq_id
        too far ahead of the model is answered 429 before, filling nothing (progress.py)."""
        await self.progress.check(rec, seq_id)
        try:
            yield
        except (InvalidRequest, NotFound) as e:
            await self._fill(rec, seq_id, str(e))
            raise

    async def _fill(self, rec: ModelRecord, seq_id: int, error: str) -> None:
        rid = request_id("train", rec.model_id, seq_id)
        msg = Rejected(request_id=rid, model_id=rec.model_id, seq_id=seq_id, error=error[:2000])
        await self.accept(rid, rec.owner, "Rejected")
        await self.bus.publish(subjects.train(rec.base_model, rec.model_id), msg, msg_id=rid)

    async def _sequenced_body(self, request: web.Request, owner: str, type_: type):
        """The JSON body of a sequenced request (it has model_id and seq_id >= 1). A body that
        does not decode but names one of the caller's models and a seq_id still fills that
        seq_id (with the decoding error) before the 400."""
        try:
            body = await read_body(request, type_)
        except InvalidRequest as e:
            try:
                place = msgspec.json.decode(await request.read(), type=_Place)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise e from None
            if place.seq_id >= 1:
                try:
                    rec = await self.model(place.model_id, owner)
                    await self.progress.check(rec, place.seq_id)
                except (InvalidRequest, NotFound, TooFarAhead):  # the decoding error it is; a retry cannot mend it
                    raise e from None
                await self._fill(rec, place.seq_id, str(e))
            raise
        if body.seq_id < 1:
            raise InvalidRequest(f"seq_id must be >= 1, got {body.seq_id}")
        return body

    async def _submit_train(self, rec: ModelRecord, msg, owner: str, kind: str) -> web.Response:
        # Measured as the bus carries it (protobuf -> msgpack can grow several times): too big
        # is a 400 here, inside the caller's _in_sequence, so its seq_id is still filled.
        size = bounds.encoded(msg, f"{kind} request")
        await self.usage.check_train_bytes(owner, msg.request_id, size)  # 429, fills nothing: the client retries
        if await self.accept(msg.request_id, owner, kind):
            self.admission.count(owner, "train", msg.request_id)
        self.usage.training(owner, msg.request_id, size)
        # Always publish, even for a request seen before: the first attempt may have died
        # between accepting and publishing. JetStream drops the duplicate by Nats-Msg-Id,
        # and the trainer applies each seq_id once.
        await self.bus.publish(subjects.train(rec.base_model, rec.model_id), msg, msg_id=msg.request_id)
        return reply({"request_id": msg.request_id, "model_id": rec.model_id})

    # -- futures

    async def retrieve_future(self, request: web.Request) -> web.Response:
        owner = self.owner(request)
        body = await read_body(request, RetrieveBody)
        timeout = self.cfg.long_poll_s
        client_timeout = request.headers.get("x-stainless-read-timeout")
        if client_timeout:
            try:
                timeout = max(0.0, min(timeout, float(client_timeout) - 5))
            except ValueError:
                pass
        # The owner is checked before any wait (`wait` returns another key's future at once):
        # another key's id answers 404 at once, so the time of the answer tells nothing about
        # whether that id exists. One KV read serves the owner check and the wait.
        names.check_id(body.request_id, "request_id")
        fut = await self.waiters.wait(body.request_id, timeout, owner=owner)
        if fut is None or fut.owner != owner:
            raise NotFound(f"unknown request_id {body.request_id!r}")
        if fut.state == "pending":
            # 408 is the SDK's quiet "try again" (a 200 try_again logs a warning per poll).
            return reply({"type": "try_again", "request_id": fut.request_id, "queue_state": "active"}, status=408)
        if fut.state == "failed":
            return reply({"error": fut.error, "category": fut.category or "unknown"})
        if fut.content_type == "forward_backward":
            result = decode(fut.payload, ForwardBackwardResult)
            return web.Response(body=wire.forward_backward_output(result), content_type="application/x-protobuf")
        if fut.content_type == "sample":
            return web.Response(body=wire.sample_response(decode(fut.payload, SampleResult)), content_type="application/x-protobuf")
        return web.Response(body=fut.payload, content_type="application/json")


GATEWAY = web.AppKey("gateway", Gateway)


_SWEEPS = web.AppKey("admission_sweeps", asyncio.Task)


def add_routes(app: web.Application, gw: Gateway) -> None:
    """The Tinker protocol's routes, and the long-poll waiters they answer from."""
    app[GATEWAY] = gw

    async def start_waiters(app: web.Application) -> None:
        await gw.waiters.start()
        app[_SWEEPS] = asyncio.get_running_loop().create_task(gw.admission.run_sweeps(gw._pending))

    async def stop_waiters(app: web.Application) -> None:
        app[_SWEEPS].cancel()
        await gw.waiters.stop()

    app.on_startup.append(start_waiters)
    app.on_cleanup.append(stop_waiters)
    r = app.router
    r.add_get(f"{API}/healthz", gw.healthz)
    r.add_post(f"{API}/client/config", gw.client_config)
    r.add_post(f"{API}/client/dynamic_config", gw.client_dynamic_config)
    r.add_post(f"{API}/create_session", gw.create_session)
    r.add_post(f"{API}/session_heartbeat", gw.session_heartbeat)
    r.add_post(f"{API}/sessions/{{session_id}}/finish", gw.finish_session)
    r.add_post(f"{API}/telemetry", gw.telemetry)
    r.add_get(f"{API}/get_server_capabilities", gw.server_capabilities)
    r.add_post(f"{API}/create_model", gw.create_model)
    r.add_post(f"{API}/get_info", gw.get_info)
    r.add_post(f"{API}/forward_backward", gw.forward_backward)
    r.add_post(f"{API}/optim_step", gw.optim_step)
    r.add_post(f"{API}/retrieve_future", gw.retrieve_future)
    r.add_post(f"{API}/save_weights_for_sampler", gw.save_weights_for_sampler)
    r.add_post(f"{API}/create_sampling_session", gw.create_sampling_session)
    r.add_get(f"{API}/samplers/{{sampler_id}}", gw.get_sampler)
    r.add_post(f"{API}/asample", gw.asample)
    r.add_post(f"{API}/save_weights", gw.save_weights)
    r.add_post(f"{API}/save_weights_external", gw.save_weights_external)
    r.add_post(f"{API}/load_weights", gw.load_weights)

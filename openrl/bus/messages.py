"""Every message that travels on the bus, in one place.

Rules (see STYLE.md):
- append-only: to evolve a message, append a field with a default; never rename,
  retype or reorder a field;
- arrays travel as packed little-endian bytes (`tokens` is int32, `logprobs` float32),
  never as lists of numbers;
- no pickle: `encode`/`decode` use msgspec's msgpack codec only.

`kw_only` is not inherited by subclasses, so every Struct repeats it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# ---------------------------------------------------------------------------
# Request bounds every process agrees on: the gateway refuses a request past them before it
# builds anything, and a worker checks again before it allocates (docs/limits.md).

MAX_NUM_SAMPLES = 128  # sequences one sample request may ask for
MAX_TOPK = 64  # topk_prompt_logprobs, topk_sample_logprobs, prompt_alt_tokens_k
MAX_STOP_STRINGS = 16  # stop strings per sample request (each row matches every one after every token)
MAX_STOP_STRING_CHARS = 256  # characters of one stop string
MAX_STOP_TOKEN_IDS = 256  # stop token ids per sample request (a [rows, ids] tensor in the sampler)
MAX_TENSOR_COLUMNS = 1024  # K of an (N, K) tensor: top-K targets, target_prompt_logprobs
# A request's tensors counted as dense (a sparse one as rows x columns, whatever it lists):
# what a worker may have to allocate for them. 2^24 elements is 128 MiB of int64.
MAX_REQUEST_ELEMENTS = 1 << 24

# ---------------------------------------------------------------------------
# Tensors and data


class Tensor(msgspec.Struct, frozen=True, kw_only=True):
    """A Tinker TensorData: dense (or CSR) little-endian bytes plus dtype and shape.

    `shape` is empty when the client sent none (then it is 1-D, inferred from the
    byte length). For CSR, `data` holds the values and `crow`/`col` int64 indices.
    """

    dtype: Literal["float32", "int64"]
    data: bytes
    shape: list[int] = []
    crow: bytes | None = None
    col: bytes | None = None


class Datum(msgspec.Struct, frozen=True, kw_only=True):
    """One training example: the model input and the loss inputs keyed by name."""

    tokens: bytes  # int32 little-endian, the concatenated text chunks
    loss_fn_inputs: dict[str, Tensor] = {}


class AdamParams(msgspec.Struct, frozen=True, kw_only=True):
    """Tinker's AdamParams; defaults are Tinker's, not torch's (spec §5.8)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


# The LoRA convention every worker follows (Tinker's): alpha is 32 whatever the rank.
LORA_ALPHA = 32


class LoraSpec(msgspec.Struct, frozen=True, kw_only=True):
    rank: int = 32
    seed: int = 0
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


# ---------------------------------------------------------------------------
# Train stream: openrl.train.<base>.<model>. One ordered log per model; the owning
# trainer applies these strictly in seq_id order, each exactly once.


class ForwardBackward(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="forward_backward"):
    request_id: str
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str] = {}
    forward_only: bool = False
    data: list[Datum] = []


class OptimStep(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="optim_step"):
    request_id: str
    model_id: str
    seq_id: int
    adam: AdamParams = AdamParams()


class Rejected(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="rejected"):
    """A training request the gateway could address but not accept (bad content).

    It still occupies its seq_id so the model's sequence has no gap; the trainer fails
    its future with category "user" when its turn comes, and changes nothing.
    """

    request_id: str
    model_id: str
    seq_id: int
    error: str
    category: str = "user"  # "server": a dead-lettered request (failed max_deliver times)


class SaveWeights(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="save_weights"):
    """Publish the model's weights as of this point in its sequence.

    kind "sampler": the LoRA adapter, for samplers. Named saves are addressed as
    `tinker://<model>/sampler_weights/<name>`; an unnamed one (save_weights_and_get_sampling_client)
    carries the id of the ephemeral sampler that will read it.
    kind "state" (save_state): adapter + AdamW state + step, `tinker://<model>/weights/<name>`.
    kind "external" (save_weights_external): a standard PEFT adapter folder,
    `tinker://<model>/external_weights/<name>`.
    """

    request_id: str
    model_id: str
    seq_id: int
    kind: Literal["sampler", "state", "external"] = "sampler"
    name: str = ""  # "" for an unnamed sampler save
    sampler_id: str = ""  # the sampler to create, for an unnamed save
    overwrite: bool = False
    ttl_s: float | None = None
    user_metadata: dict[str, str] = {}


class LoadWeights(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="load_weights"):
    """load_state[_with_optimizer] into an existing model, in its sequence."""

    request_id: str
    model_id: str
    seq_id: int
    path: str  # tinker://<run>/weights/<name>
    object: str  # its object-store name (the gateway checked it exists and may be read)
    with_optimizer: bool = False


TrainRequest = ForwardBackward | OptimStep | Rejected | SaveWeights | LoadWeights


# ---------------------------------------------------------------------------
# Create queue: openrl.create.<base>. Any trainer serving <base> may take it.


class CreateModel(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="create_model"):
    request_id: str
    model_id: str
    base_model: str
    lora: LoraSpec = LoraSpec()
    init_path: str = ""  # create-via-load: the checkpoint it starts from (the record has the object)


# ---------------------------------------------------------------------------
# KV records


class ModelRecord(msgspec.Struct, frozen=True, kw_only=True):
    """KV `models`, key = model_id. Written by the gateway at create time."""

    model_id: str
    session_id: str
    owner: str  # key id of the API key that created it
    base_model: str
    lora: LoraSpec
    created_at: float
    create_request_id: str
    user_metadata: dict[str, str] = {}
    init_state: str | None = None  # create-via-load: object name of the checkpoint loaded at seq 0
    init_path: str = ""  # ... and its tinker:// path
    init_with_optimizer: bool = False
    copy_of: str = ""  # made by copy_weights to hold a copy: the source's tinker:// path; never trained


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """KV `sessions`, key = session_id."""

    session_id: str
    owner: str
    created_at: float
    tags: list[str] = []
    user_metadata: dict[str, str] = {}
    project_id: str | None = None
    display_name: str | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    last_heartbeat: float = 0.0


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """KV `workers`, key = worker id. Heartbeat of a live worker; expires with the bucket TTL."""

    worker_id: str
    kind: Literal["trainer", "sampler", "rewarder"]
    host: str
    pid: int
    base_model: str
    model_name: str = ""  # the name clients use (HF-style), may equal base_model
    tokenizer_id: str = ""  # what get_info reports as model_data.tokenizer_id
    arch: str = ""
    vocab_size: int = 0
    max_context: int = 0
    lora_alpha: int = 32
    lora_targets: list[str] = []
    device: str = ""
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    busy_fraction: float = 0.0
    models: int = 0
    reward_name: str = ""  # a rewarder: the reward function it serves
    concurrency: int = 0  # a rewarder: calls it runs at once (its process pool)
    ranks: int = 1  # a trainer: the ranks of its group (torch.distributed), 1 for a single process


class WeightsRecord(msgspec.Struct, frozen=True, kw_only=True):
    """KV `weights`, key = the tinker:// path. The bytes are in the object store under `object`."""

    path: str  # tinker://<model_id>/<segment>/<name>
    owner: str
    model_id: str
    base_model: str
    kind: Literal["sampler", "state", "external"]
    name: str
    object: str  # object-store name (a prefix of its `files` for an external folder)
    lora: LoraSpec
    seq_id: int  # the weights are the model's state after every request before this seq_id
    size_bytes: int
    created_at: float
    expires_at: float | None = None
    files: list[str] = []  # external: the folder's file names, each at f"{object}/{name}"
    public: bool = False  # published: other keys may read (sample, load, copy) but not change it
    user_metadata: dict[str, str] = {}


class SnapshotRecord(msgspec.Struct, frozen=True, kw_only=True):
    """KV `snapshots`, key = model_id: the newest full state (adapter + AdamW) of a model,
    taken right after request `seq_id` applied. Recovery loads it and replays only the log
    after it, so recovery time is bounded by the snapshot interval, not the model's age."""

    model_id: str
    seq_id: int
    object: str
    size_bytes: int
    created_at: float


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """KV `leases`, key = subjects.lease_key(base, model): the one trainer that owns a model.

    Written with compare-and-set only (create, or update at the revision read), so two
    trainers never both think they won. `epoch` counts owners; `failed` marks a model no
    trainer can load (a create-via-load of an unusable checkpoint), so none keeps trying."""

    model_id: str
    base_model: str
    owner: str  # the trainer's worker id
    epoch: int = 1
    acquired_at: float = 0.0
    previous_owner: str = ""
    failed: str | None = None


class ApiKeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """KV `keys`, key = key id (a SHA-256 of the API key; the key itself is never stored).
    Written by `openrl keys`; every gateway watches the bucket, so a revocation holds at once."""

    key_id: str
    name: str
    created_at: float
    revoked_at: float | None = None
    hint: str = ""  # the key's first characters, to tell keys apart in a listing


class InFlight(msgspec.Struct, frozen=True, kw_only=True):
    """KV `inflight`, key = a gateway replica's id: what that replica has accepted and not yet
    seen finish, by kind ("reward" items, "sample" sequences, "train" bytes) and owner. Every
    replica adds the others' to its own before a quota check (gateway/quotas.py), so a key's
    in-flight quotas hold over all replicas. Rewritten while the replica lives (bucket TTL)."""

    replica: str
    at: float
    held: dict[str, dict[str, int]] = {}


class SamplerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """KV `samplers`, key = sampler id (`<session>:sample:<n>`): what a sampling session samples."""

    sampler_id: str
    owner: str
    session_id: str
    base_model: str
    model_path: str | None = None  # tinker:// path, None for the base model
    weights: str | None = None  # object-store name of the adapter, None for the base model
    lora: LoraSpec | None = None
    created_at: float = 0.0


# ---------------------------------------------------------------------------
# Sample stream: openrl.sample.<base>. A work queue; any sampler of <base> takes a request.


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to sample, as the gateway read it from Tinker's SamplingParams; the engines read
    this same struct (openrl.bus.sampling.check_params holds the checks that need no model)."""

    max_tokens: int | None = None  # None: the sampler's default
    temperature: float = 1.0  # below 1e-5: greedy
    top_k: int = -1  # -1: off
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh seed
    stop_strings: list[str] = []
    stop_token_ids: list[int] = []
    stop_at_eos: bool = True  # False when the client sent stop=[] (run to max_tokens)


class SampleRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The sampling fields from max_tokens to stop_at_eos are superseded by `sampling`, which
    the gateway fills; a sampler reads them only from a message without it (an older gateway)."""

    request_id: str
    sampler_id: str
    base_model: str
    weights: str | None = None  # adapter object name; None samples the base model
    lora: LoraSpec | None = None
    prompt: bytes  # int32 little-endian
    num_samples: int = 1
    max_tokens: int = 0  # 0: the sampler's default
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = []
    stop_token_ids: list[int] = []
    stop_at_eos: bool = True  # False when the client sent stop=[]
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: Tensor | None = None  # int64 [L-1, K], -1 = nothing asked
    prompt_alt_tokens_k: int = 0
    sampling: SamplingParams | None = None


class TopK(msgspec.Struct, frozen=True, kw_only=True):
    """[rows, k] top-k token ids (int64) and logprobs (float32); empty cells (0, -99999)."""

    k: int
    tokens: bytes
    logprobs: bytes


class SampledSequence(msgspec.Struct, frozen=True, kw_only=True):
    tokens: bytes  # int32, generated tokens only
    logprobs: bytes  # float32, one per generated token
    stop_reason: Literal["stop", "length"]
    topk: TopK | None = None


class SampleResult(msgspec.Struct, frozen=True, kw_only=True):
    sequences: list[SampledSequence]
    prompt_logprobs: bytes | None = None  # float32 [L], NaN where not scored
    topk_prompt: TopK | None = None
    target_prompt_logprobs: Tensor | None = None  # float32, shape and layout of the request
    prompt_alt: TopK | None = None  # [L-1, k] independent draws and their logprobs


class ForwardBackwardResult(msgspec.Struct, frozen=True, kw_only=True):
    """The result of a forward / forward_backward: per-datum float32 logprobs plus metrics."""

    logprobs: list[bytes]  # float32 little-endian, one array per datum, in request order
    metrics: dict[str, float]  # "name:reduction" keys, always with "loss:sum"
    trailing: list[list[int]] = []  # per datum, the shape after N: [] for (N,), [K] for (N, K) targets


class Future(msgspec.Struct, frozen=True, kw_only=True):
    """KV `futures`, key = request_id.

    state "pending" is written by the gateway when it accepts a request; the worker
    overwrites it with "done" or "failed" (error + category, as Tinker's RequestFailed).
    A done payload is either the JSON body of the Tinker result (`content_type`
    "json") or a msgspec result Struct named by `content_type` (e.g.
    "forward_backward" → `ForwardBackwardResult`), which the gateway turns into the
    protobuf the SDK expects: protocol encodings stay at the edge.
    """

    request_id: str
    owner: str
    request_type: str  # Tinker's X-Tinker-Request-Type, e.g. "ForwardBackward"
    state: Literal["pending", "done", "failed"] = "pending"
    content_type: Literal["json", "forward_backward", "sample"] = "json"
    payload: bytes = b""
    error: str = ""
    category: Literal["user", "server", "unknown", ""] = ""
    created_at: float = 0.0
    finished_at: float = 0.0



# ---------------------------------------------------------------------------
# Reward stream: openrl.reward.<name>. A work queue; any rewarder serving <name> takes a request.


class ScoreItem(msgspec.Struct, frozen=True, kw_only=True):
    prompt: str = ""
    completion: str
    reference: bytes = b"null"  # the task's reference data as JSON text (any JSON value)


class ScoreRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Score every item with the reward function `reward_name`; the result goes to the
    future `request_id` (a `ScoreResult` as JSON)."""

    request_id: str
    reward_name: str
    items: list[ScoreItem]


class ItemScore(msgspec.Struct, frozen=True, kw_only=True):
    """One item's outcome: its reward (and named components), or the error that replaced it."""

    reward: float | None = None
    metrics: dict[str, float] = {}
    error: str | None = None
    error_kind: Literal["exception", "timeout", "crashed", "memory", "bad_result"] | None = None
    seconds: float = 0.0


class ScoreResult(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="score"):
    """The payload of a done score future, as JSON: one ItemScore per item, in request order."""

    request_id: str
    reward_name: str
    scores: list[ItemScore]
    worker_id: str = ""

class Secret(msgspec.Struct, frozen=True, kw_only=True):
    """KV `secrets`: a key every gateway shares (created once, first writer wins)."""

    secret: bytes
    created_at: float


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Stream OPENRL_AUDIT, subject openrl.audit.<owner>: one change to the catalogue, a
    session or a key, as it happened. `event` is `<resource>_<action>` (checkpoint_delete)."""

    at: float
    owner: str  # the key id the event belongs to (whose thing changed)
    event: str
    actor: str = ""  # the key id that did it ("" for the system: the TTL reaper, the CLI)
    tinker_path: str | None = None
    model_id: str | None = None
    session_id: str | None = None
    details: dict[str, str] = {}


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Stream OPENRL_USAGE, subject openrl.usage.<owner>: work a worker did for one owner.
    kind "training": tokens through forward(_backward); "sampling_prefill": prompt tokens;
    "sampling_sample": generated tokens. `seconds` is the worker's wall time on it. A training
    record also says which call it was (an optim_step is one with no tokens), where in its model's
    sequence, and the metrics its result reported: the web console's per-step curves."""

    at: float
    owner: str
    kind: Literal["training", "sampling_prefill", "sampling_sample"]
    tokens: int
    seconds: float
    base_model: str
    session_id: str = ""
    model_id: str = ""  # the training run, or the sampler id for sampling
    request_id: str = ""
    call: str = ""  # training: "forward", "forward_backward" or "optim_step"; "" from an older trainer
    seq_id: int = -1  # training: the request's seq_id in its model's sequence
    metrics: dict[str, float] = {}  # training: the result's, e.g. loss:sum, tokens:sum; grad_norm:mean


class AdapterStored(msgspec.Struct, frozen=True, kw_only=True):
    """A sampler weights version is in the object store (subjects.adapter_stored): trainer ->
    samplers, so that one that served an earlier version of the model prefetches it."""

    model_id: str
    object: str  # paths.adapter_object(model_id, seq_id)
    size_bytes: int


_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


_decoders: dict[object, msgspec.msgpack.Decoder] = {}


def decode(data: bytes, type_: object):
    """Decode `data` as `type_` (a Struct or a tagged union); raises msgspec.DecodeError/ValidationError."""
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.msgpack.Decoder(type_)
    return dec.decode(data)

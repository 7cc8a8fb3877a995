"""Multi-tenant LoRA training: one frozen base model, one peft adapter and one AdamW per model_id.

Pure compute: no networking, no asyncio, called from a single thread. Every request is
validated completely before any state is touched, so an `InvalidRequest` changes nothing.

All tenants live in one `PeftModel` as named adapters ("t0", "t1", ...: model ids may hold
'.', which peft cannot take). Before computing for a tenant we make its adapter the only
active one; peft then marks only that adapter `requires_grad`, so a backward pass reaches
its parameters alone, and each tenant's AdamW holds only its own parameters.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from openrl.bus.errors import InvalidRequest, NotFound
from openrl.bus.messages import AdamParams, Datum, ForwardBackward, LoraSpec, Tensor

log = structlog.get_logger(__name__)

LORA_ALPHA = 32  # Tinker ("LoRA without regret"): alpha is 32 whatever the rank
MAX_RANK = 256
LOSSES = ("cross_entropy",)

# Which modules each LoraSpec flag targets; names shared by Llama, Qwen2/3, Mistral...
TARGETS = {
    "train_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "train_mlp": ("gate_proj", "up_proj", "down_proj"),
    "train_unembed": ("lm_head",),
}

_NP_DTYPES = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}
_INPUTS = {"target_tokens": "int64", "weights": "float32"}  # cross_entropy's inputs and their dtypes


@dataclass(frozen=True)
class BaseInfo:
    model_name: str  # the name clients use
    arch: str  # config.model_type, e.g. "qwen3"
    vocab_size: int  # rows of the input embedding
    max_context: int  # config.max_position_embeddings
    lora_alpha: int
    lora_targets: tuple[str, ...]  # modules targeted when every train_* flag is on
    device: str  # "cuda" | "mps" | "cpu"
    dtype: str  # "float32" | "bfloat16"


@dataclass
class FwdBwdResult:
    logprobs: list[np.ndarray]  # per datum, float32 (N,): lp of target_tokens[i] given tokens[:i+1]
    metrics: dict[str, float]  # "loss:sum", "tokens:sum"


@dataclass
class _Tenant:
    adapter: str  # peft adapter name
    lora: LoraSpec
    params: dict[str, torch.nn.Parameter]  # stable name (adapter name removed) -> parameter
    opt: torch.optim.AdamW


@dataclass
class _Batch:
    """A validated request: per datum int64 arrays of tokens and targets, float32 weights."""

    tokens_D: list[np.ndarray]
    targets_D: list[np.ndarray]
    weights_D: list[np.ndarray]


def pick_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class LoraEngine:
    def __init__(
        self,
        model_path: str,
        *,
        model_name: str | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
    ):
        device = device or pick_device()
        # bf16 halves memory and is what GPUs train in; CPU/MPS bf16 matmuls are slow or inexact.
        dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.to(device).eval()  # eval: no dropout anywhere, training is deterministic
        model.requires_grad_(False)
        self.model = model
        self.peft: PeftModel | None = None  # wraps `model` once the first tenant exists
        self._tenants: dict[str, _Tenant] = {}
        self._active: str | None = None  # peft adapter currently active
        self._next = 0
        linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        cfg = model.config
        self.info = BaseInfo(
            model_name=model_name or model_path,
            arch=cfg.model_type,
            vocab_size=model.get_input_embeddings().num_embeddings,
            max_context=cfg.max_position_embeddings,
            lora_alpha=LORA_ALPHA,
            lora_targets=tuple(n for names in TARGETS.values() for n in names if n in linear_names),
            device=device,
            dtype=str(dtype).removeprefix("torch."),
        )
        log.info("base_loaded", path=model_path, arch=self.info.arch, device=device, dtype=self.info.dtype)

    # ------------------------------------------------------------------ tenants

    def create(self, model_id: str, lora: LoraSpec) -> None:
        if model_id in self._tenants:
            raise InvalidRequest(f"model {model_id!r} already exists")
        if not 1 <= lora.rank <= MAX_RANK:
            raise InvalidRequest(f"lora rank must be in [1, {MAX_RANK}], got {lora.rank}")
        wanted = [n for flag, names in TARGETS.items() if getattr(lora, flag) for n in names]
        targets = [n for n in self.info.lora_targets if n in wanted]
        if not targets:
            raise InvalidRequest("lora targets nothing: set at least one of train_attn, train_mlp, train_unembed")
        adapter = f"t{self._next}"
        self._next += 1
        config = LoraConfig(r=lora.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets)
        self._inject(adapter, config, lora.seed)
        params = {
            name.replace(f".{adapter}.", "."): p
            for name, p in self.peft.named_parameters()
            if f".{adapter}." in name
        }
        # fused: one kernel for all of a tenant's small LoRA tensors; CPU/MPS keep torch's default.
        opt = torch.optim.AdamW(params.values(), lr=0.0, fused=True if self.info.device == "cuda" else None)
        self._tenants[model_id] = _Tenant(adapter=adapter, lora=lora, params=params, opt=opt)
        log.info("tenant_created", model_id=model_id, adapter=adapter, rank=lora.rank, targets=len(targets))

    def _inject(self, adapter: str, config: LoraConfig, seed: int) -> None:
        """Add an adapter whose init depends on `seed` alone, not on the global RNG or other tenants."""
        cuda_devices = list(range(torch.cuda.device_count()))
        # peft builds LoRA layers on CPU and inits them from the global CPU generator, then moves
        # them; fork_rng keeps the caller's RNG streams untouched.
        with torch.random.fork_rng(devices=cuda_devices), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tied lm_head, gradient-checkpointing deprecations
            torch.manual_seed(seed % 2**64)  # any Python int is a valid seed
            if self.peft is None:
                self.peft = get_peft_model(self.model, config, adapter_name=adapter)
                self._active = adapter
            else:
                # Leaves the active adapter as it was (peft re-applies its requires_grad flags).
                self.peft.add_adapter(adapter, config)
        self.peft.eval()

    def has(self, model_id: str) -> bool:
        return model_id in self._tenants

    def drop(self, model_id: str) -> None:
        tenant = self._tenant(model_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "adapter was active which is now deleted"
            self.peft.delete_adapter(tenant.adapter)
        self._active = None  # peft picks a new active adapter when the active one goes
        del self._tenants[model_id]
        log.info("tenant_dropped", model_id=model_id, adapter=tenant.adapter)

    def model_ids(self) -> list[str]:
        return list(self._tenants)

    def adapter_state(self, model_id: str) -> dict[str, torch.Tensor]:
        """CPU copies of the tenant's LoRA weights, keyed as in a saved peft adapter."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self._tenant(model_id).params.items()}

    def adapter_grads(self, model_id: str) -> dict[str, torch.Tensor | None]:
        """CPU copies of the gradients accumulated since the last optim_step (None where none)."""
        params = self._tenant(model_id).params
        return {name: None if p.grad is None else p.grad.to("cpu", copy=True) for name, p in params.items()}

    def _tenant(self, model_id: str) -> _Tenant:
        tenant = self._tenants.get(model_id)
        if tenant is None:
            raise NotFound(f"model {model_id!r} not found on this trainer")
        return tenant

    def _activate(self, tenant: _Tenant) -> None:
        # set_adapter walks every module, so skip it when the tenant is already active.
        if self._active != tenant.adapter:
            self.peft.set_adapter(tenant.adapter)
            self._active = tenant.adapter

    # ------------------------------------------------------------------ compute

    def forward_backward(self, req: ForwardBackward) -> FwdBwdResult:
        tenant = self._tenant(req.model_id)
        if req.loss_fn not in LOSSES:
            raise InvalidRequest(f"loss_fn {req.loss_fn!r} is not supported; supported: {', '.join(LOSSES)}")
        batch = _parse(req.data, self.info.vocab_size, self.info.max_context)
        if not batch.tokens_D:
            return FwdBwdResult(logprobs=[], metrics={"loss:sum": 0.0, "tokens:sum": 0.0})
        self._activate(tenant)
        if req.forward_only:
            with torch.inference_mode():
                lp_M, loss = self._cross_entropy(batch)
        else:
            lp_M, loss = self._cross_entropy(batch)
            loss.backward()  # accumulates into .grad until optim_step
        lengths = [len(t) for t in batch.tokens_D]
        logprobs = np.split(lp_M.detach().float().cpu().numpy(), np.cumsum(lengths)[:-1])
        return FwdBwdResult(logprobs=logprobs, metrics={"loss:sum": loss.item(), "tokens:sum": float(sum(lengths))})

    def _cross_entropy(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded forward of every datum; returns (logprobs of real positions, -sum(w * lp))."""
        lengths = [len(t) for t in batch.tokens_D]
        ids_B_T = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
        real_B_T = np.zeros(ids_B_T.shape, dtype=bool)
        for i, tokens in enumerate(batch.tokens_D):
            ids_B_T[i, : len(tokens)] = tokens
            real_B_T[i, : len(tokens)] = True
        device = self.info.device
        # Right padding under a causal mask: real positions never attend to the pads after
        # them, so no attention_mask is needed and SDPA keeps its fast is_causal path.
        logits_B_T_V = self.peft(input_ids=torch.from_numpy(ids_B_T).to(device)).logits
        logits_M_V = logits_B_T_V[torch.from_numpy(real_B_T).to(device)]
        targets_M = torch.from_numpy(np.concatenate(batch.targets_D)).to(device)
        weights_M = torch.from_numpy(np.concatenate(batch.weights_D)).to(device)
        lp_M = -F.cross_entropy(logits_M_V.float(), targets_M, reduction="none")
        return lp_M, -(weights_M * lp_M).sum()

    def optim_step(self, model_id: str, adam: AdamParams) -> dict[str, float]:
        tenant = self._tenant(model_id)
        _check_adam(adam)
        # AdamW skips params without grads; so do we (no forward_backward since the last step).
        params = [p for p in tenant.params.values() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.tensor(0.0)
        if adam.grad_clip_norm > 0 and params:
            torch.nn.utils.clip_grads_with_norm_(params, adam.grad_clip_norm, norm)
        # Tinker sends the hyperparameters with every step (schedules live in the client).
        tenant.opt.param_groups[0].update(
            lr=adam.learning_rate,
            betas=(adam.beta1, adam.beta2),
            eps=adam.eps,
            weight_decay=adam.weight_decay,
        )
        tenant.opt.step()
        tenant.opt.zero_grad(set_to_none=True)
        return {"grad_norm:mean": norm.item(), "learning_rate:mean": adam.learning_rate}


# ---------------------------------------------------------------------- validation


def _check_adam(adam: AdamParams) -> None:
    values = {name: getattr(adam, name) for name in AdamParams.__struct_fields__}
    bad = [name for name, v in values.items() if not math.isfinite(v)]
    if bad:
        raise InvalidRequest(f"adam params must be finite: {', '.join(bad)}")
    if adam.learning_rate < 0:
        raise InvalidRequest(f"learning_rate must be >= 0, got {adam.learning_rate}")
    for name in ("beta1", "beta2"):
        if not 0 <= values[name] < 1:
            raise InvalidRequest(f"{name} must be in [0, 1), got {values[name]}")
    if adam.eps <= 0:
        raise InvalidRequest(f"eps must be > 0, got {adam.eps}")
    if adam.weight_decay < 0:
        raise InvalidRequest(f"weight_decay must be >= 0, got {adam.weight_decay}")
    if adam.grad_clip_norm < 0:
        raise InvalidRequest(f"grad_clip_norm must be >= 0, got {adam.grad_clip_norm}")


def _parse(data: list[Datum], vocab: int, max_context: int) -> _Batch:
    batch = _Batch(tokens_D=[], targets_D=[], weights_D=[])
    for i, datum in enumerate(data):
        tokens, targets, weights = _parse_datum(datum, f"data[{i}]", vocab, max_context)
        batch.tokens_D.append(tokens)
        batch.targets_D.append(targets)
        batch.weights_D.append(weights)
    return batch


def _parse_datum(datum: Datum, where: str, vocab: int, max_context: int) -> tuple[np.ndarray, ...]:
    if len(datum.tokens) % 4:
        raise InvalidRequest(f"{where}.tokens: {len(datum.tokens)} bytes is not a whole number of int32")
    tokens = np.frombuffer(datum.tokens, dtype="<i4").astype(np.int64)
    n = len(tokens)
    if n == 0:
        raise InvalidRequest(f"{where}.tokens is empty")
    if n > max_context:
        raise InvalidRequest(f"{where}.tokens: {n} tokens exceed the max context {max_context}")
    _check_ids(tokens, f"{where}.tokens", vocab)
    unknown = sorted(set(datum.loss_fn_inputs) - set(_INPUTS))
    if unknown:
        raise InvalidRequest(f"{where}.loss_fn_inputs: unknown {unknown}; cross_entropy takes {sorted(_INPUTS)}")
    if "target_tokens" not in datum.loss_fn_inputs:
        raise InvalidRequest(f"{where}.loss_fn_inputs: target_tokens is required")
    targets = _input(datum, "target_tokens", where, n)
    _check_ids(targets, f"{where}.loss_fn_inputs.target_tokens", vocab)
    if "weights" in datum.loss_fn_inputs:
        weights = _input(datum, "weights", where, n)
        if not np.isfinite(weights).all():
            raise InvalidRequest(f"{where}.loss_fn_inputs.weights: values must be finite")
    else:
        weights = np.ones(n, dtype=np.float32)
    return tokens, targets, weights


def _check_ids(ids: np.ndarray, where: str, vocab: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InvalidRequest(f"{where}: token ids must be in [0, {vocab}), got {lo if lo < 0 else hi}")


def _input(datum: Datum, name: str, where: str, n: int) -> np.ndarray:
    """A loss input as a (n,) array of its required dtype."""
    where = f"{where}.loss_fn_inputs.{name}"
    t = datum.loss_fn_inputs[name]
    if t.dtype != _INPUTS[name]:
        raise InvalidRequest(f"{where}: dtype must be {_INPUTS[name]}, got {t.dtype}")
    values = _array(t, where)
    if values.ndim == 2 and values.shape[0] == n:
        raise InvalidRequest(f"{where}: 2-D (N, K) inputs are not supported yet, got shape {list(values.shape)}")
    if values.shape != (n,):
        raise InvalidRequest(f"{where}: shape must be [{n}] (one per token), got {list(values.shape)}")
    return values


def _array(t: Tensor, where: str) -> np.ndarray:
    """Decode a Tensor (dense or CSR) into a numpy array of its shape."""
    dtype = _NP_DTYPES[t.dtype]
    values = _frombuffer(t.data, dtype, where)
    if any(d < 0 for d in t.shape):
        raise InvalidRequest(f"{where}: negative shape {t.shape}")
    if t.crow is not None or t.col is not None:
        return _densify(values, t, where)
    if not t.shape:
        return values  # no shape sent: 1-D
    if math.prod(t.shape) != values.size:
        raise InvalidRequest(f"{where}: shape {t.shape} does not match {values.size} values")
    return values.reshape(t.shape)


def _frombuffer(data: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise InvalidRequest(f"{where}: {len(data)} bytes is not a whole number of {dtype.name}")
    return np.frombuffer(data, dtype=dtype)


def _densify(values: np.ndarray, t: Tensor, where: str) -> np.ndarray:
    """CSR -> dense, unlisted entries 0. A 1-D shape is read as a single row."""
    if t.crow is None or t.col is None:
        raise InvalidRequest(f"{where}: CSR needs both crow and col indices")
    if len(t.shape) not in (1, 2):
        raise InvalidRequest(f"{where}: CSR needs a 1-D or 2-D shape, got {t.shape}")
    rows, cols = (1, t.shape[0]) if len(t.shape) == 1 else t.shape
    crow = _frombuffer(t.crow, _NP_DTYPES["int64"], f"{where}.crow")
    col = _frombuffer(t.col, _NP_DTYPES["int64"], f"{where}.col")
    ok = (
        len(crow) == rows + 1
        and crow[0] == 0
        and crow[-1] == len(col) == len(values)
        and (np.diff(crow) >= 0).all()
        and (len(col) == 0 or (col.min() >= 0 and col.max() < cols))
    )
    if not ok:
        raise InvalidRequest(f"{where}: malformed CSR indices for shape {t.shape}")
    dense = np.zeros((rows, cols), dtype=values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense.reshape(t.shape)

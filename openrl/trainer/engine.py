"""Multi-tenant LoRA training: one frozen base model, one peft adapter and one AdamW per model_id.

Pure compute: no networking, no asyncio, called from a single thread. Every request is
validated completely (`requests.py`) before any state is touched, and gradients that come out
non-finite are refused before they reach `.grad`, so an `InvalidRequest` changes nothing. The
loss math is in `losses.py`; this file turns a request into its tensors and back.

Memory per request is bounded whatever its size: datums run in micro-batches of at most
`microbatch_tokens` padded tokens (grouped by length), their gradients accumulated, and the
logits are never materialised beyond `logits_chunk_bytes` of fp32 at a time (log-softmax and
gather per chunk of positions; in a backward pass each chunk is recomputed, not kept). Every
loss is a sum of per-datum terms and no datum is ever split, so the results equal one pass
over the whole request. Activation checkpointing of the decoder layers is an option (on by
default on CUDA).

On CPU a long pass may also pause inside (pauses.py): `forward_backward_steps` runs a pass of
`PREEMPT_MIN_TOKENS` or more on a thread of its own that hands the compute thread back at the
next boundary of a decoder layer or of its attention or MLP block (or of a chunk of the head)
once `preempt_slice_ms` has passed, so other keys' short calls run inside one key's long pass;
the pass's results are the same.

In a trainer group (`sharded=True` under an initialised torch.distributed process group of N
ranks), the frozen base is sharded with FSDP2 (`fully_shard` per decoder layer, then the root),
and every rank makes the same calls in the same order (group.py hands them out). Adapters and
their AdamW state stay whole on every rank (they are small, and peft adds them after sharding);
a request's micro-batches are dealt round-robin over the ranks, each rank runs the same number
of passes (a rank short of work runs a zero-weight pass, so FSDP's collectives line up), and
the gradients and loss are summed over the ranks before the finite check, so every rank
applies the same update. Rank 0 gets every datum's logprobs.

All tenants live in one `PeftModel` as named adapters ("t0", "t1", ...: model ids may hold
'.', which peft cannot take). Before computing for a tenant we make its adapter the only
active one; peft then marks only that adapter `requires_grad`, so a backward pass reaches
its parameters alone, and each tenant's AdamW holds only its own parameters.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Generator
import json
import warnings
from dataclasses import dataclass

import numpy as np
import structlog
import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save as safetensors_save

from openrl.base_model import default_dtype, load_base, pick_device
from openrl.bus.errors import InvalidRequest, NotFound
from openrl.bus.messages import LORA_ALPHA, AdamParams, ForwardBackward, LoraSpec
from openrl.lora_slots import LoraSlots, Segment
from openrl.trainer import losses, requests
from openrl.trainer.pauses import PausablePasses, in_pausable_pass, pause_point

log = structlog.get_logger(__name__)

MAX_RANK = 256
LOSSES = tuple(losses.SIGNATURES)

# Which modules each LoraSpec flag targets; names shared by Llama, Qwen2/3, Mistral...
TARGETS = {
    "train_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "train_mlp": ("gate_proj", "up_proj", "down_proj"),
    "train_unembed": ("lm_head",),
}

# Micro-batch token budgets (padded tokens per forward) by device when none is given.
MICROBATCH_TOKENS = {"cuda": 16384, "mps": 4096, "cpu": 4096}
# fp32 logits materialised at once: 256 MiB is ~440 positions of a 152k vocabulary.
LOGITS_CHUNK_BYTES = 256 * 2**20
# Pausing inside a pass (pauses.py), CPU only: the longest a pass runs before it hands the
# compute thread back at its next block boundary (by default; 0: never), and the fewest tokens
# of a pass that may pause (shorter ones end soon anyway, and skip the thread hand-over).
PREEMPT_SLICE_MS = {"cpu": 50.0}
PREEMPT_MIN_TOKENS = 512
# Passes paused at once, at most (several keys' long requests may each pause; a fifth runs
# whole): each holds one micro-batch's activations while it waits.
PREEMPT_MAX_PASSES = 4

# Checkpoints (export_state / import_state): safetensors tensors keyed like a saved peft
# adapter, AdamW state under "optimizer.<key>.<exp_avg|exp_avg_sq|step>", string metadata.
STATE_FORMAT = "openrl.lora_state"
STATE_VERSION = "1"
OPTIMIZER_PREFIX = "optimizer."
_MOMENTS = ("exp_avg", "exp_avg_sq")
_FLAGS = tuple(TARGETS)  # train_attn, train_mlp, train_unembed


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
    logprobs: list[np.ndarray]  # per datum, float32 shaped as its target_tokens ((N,) or (N, K))
    metrics: dict[str, float]  # "loss:sum", "tokens:sum"


@dataclass
class _Tenant:
    adapter: str  # peft adapter name
    lora: LoraSpec
    params: dict[str, torch.nn.Parameter]  # stable name (adapter name removed) -> parameter
    opt: torch.optim.AdamW


@dataclass(frozen=True)
class _StateMeta:
    """A checkpoint's metadata, parsed and checked for form (not yet against a tenant)."""

    lora: LoraSpec
    lora_alpha: int
    targets: tuple[str, ...]
    arch: str
    vocab_size: int
    optimizer: str  # "adamw" | "none"


class LoraEngine:
    def __init__(
        self,
        model_path: str,
        *,
        model_name: str | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        microbatch_tokens: int | None = None,
        activation_checkpointing: bool | None = None,
        logits_chunk_bytes: int = LOGITS_CHUNK_BYTES,
        sharded: bool = False,
        preempt_slice_ms: float | None = None,
    ):
        device = device or pick_device()
        if preempt_slice_ms is not None and preempt_slice_ms < 0:
            raise ValueError(f"preempt_slice_ms must be >= 0, got {preempt_slice_ms}")
        if preempt_slice_ms and device != "cpu":
            # CUDA's autograd runs each device's backward passes on one thread of its own: a
            # backward paused in a hook there would stall the next call's backward.
            raise ValueError(f"pausing inside a pass (preempt_slice_ms) is for the CPU only, not {device!r}")
        if microbatch_tokens is not None and microbatch_tokens < 1:
            raise ValueError(f"microbatch_tokens must be >= 1, got {microbatch_tokens}")
        dtype = dtype or default_dtype(device)
        model = load_base(model_path, device, dtype, move=not sharded)
        self.model = model
        self.peft: PeftModel | None = None  # wraps `model` once the first tenant exists
        self.microbatch_tokens = microbatch_tokens or MICROBATCH_TOKENS[device]
        self.checkpointing = device == "cuda" if activation_checkpointing is None else activation_checkpointing
        if self.checkpointing:
            _enable_checkpointing(model, self._checkpoint_contexts)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
        if sharded:
            _shard(model, device)
        self._eval()
        self._decoder = model.get_decoder()
        slice_ms = PREEMPT_SLICE_MS.get(device, 0.0) if preempt_slice_ms is None else preempt_slice_ms
        # One rank only: a group's ranks must reach their collectives together.
        self._pauses = PausablePasses(slice_ms / 1000, PREEMPT_MAX_PASSES) if slice_ms and self.world == 1 else None
        if self._pauses is not None:
            _add_pause_points(_checkpointed_layers(model) or list(self._decoder.layers))
        self._softcap = getattr(model.config, "final_logit_softcapping", None)
        self._chunk_rows = max(1, logits_chunk_bytes // (4 * model.get_output_embeddings().out_features))
        self._tenants: dict[str, _Tenant] = {}
        self._active: str | None = None  # peft adapter currently active
        self._slots: LoraSlots | None = None  # per-row routing for shared passes (forward_backward_many)
        self._lora_layers: list | None = None  # peft's LoRA layers (a shared pass turns them off), until an adapter comes or goes
        self._lora_keys: dict[str, torch.nn.Module] | None = None  # the same by module name, listed with them (_peft_layers)
        named = list(model.named_modules())
        self._module_keys = [k for k, _ in named if k]  # the base model's, before peft wraps it
        self.direct_layers = True  # add and drop tenants on the LoRA layers directly (_inject, drop); False: peft's add_adapter and delete_adapter
        # Shared passes run every tenant's LoRA terms of a layer in one pass instead of a matmul pair
        # per tenant (LoraSlots.dense_segments): None where that is cheap (docs/tenants.md), True
        # always, False never.
        self.dense_shared_passes: bool | None = None
        self._next = 0
        linear_names = {name.rsplit(".", 1)[-1] for name, m in named if isinstance(m, torch.nn.Linear)}
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
        log.info(
            "base_loaded", path=model_path, arch=self.info.arch, device=device, dtype=self.info.dtype,
            microbatch_tokens=self.microbatch_tokens, activation_checkpointing=self.checkpointing,
            preempt_slice_ms=slice_ms if self._pauses else 0,
        )  # fmt: skip

    def _eval(self) -> None:
        """Eval mode everywhere (no dropout: training is deterministic). With activation
        checkpointing the decoder layers themselves, not their children, are marked training:
        transformers checkpoints a layer only when it is in training mode."""
        (self.peft or self.model).eval()
        if self.checkpointing:
            for module in _checkpointed_layers(self.model):
                module.training = True

    # ------------------------------------------------------------------ tenants

    def create(self, model_id: str, lora: LoraSpec) -> None:
        if model_id in self._tenants:
            raise InvalidRequest(f"model {model_id!r} already exists")
        if not 1 <= lora.rank <= MAX_RANK:
            raise InvalidRequest(f"lora rank must be in [1, {MAX_RANK}], got {lora.rank}")
        targets = self._targets(lora)
        if not targets:
            raise InvalidRequest("lora targets nothing: set at least one of train_attn, train_mlp, train_unembed")
        adapter = f"t{self._next}"
        self._next += 1
        config = LoraConfig(r=lora.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets)
        params = self._inject(adapter, config, targets, lora.seed)
        opt = self._new_adamw(params)
        self._tenants[model_id] = _Tenant(adapter=adapter, lora=lora, params=params, opt=opt)
        log.info("tenant_created", model_id=model_id, adapter=adapter, rank=lora.rank, targets=len(targets))

    def _targets(self, lora: LoraSpec) -> list[str]:
        """The modules a LoraSpec targets on this base model, in `info.lora_targets` order."""
        wanted = [n for flag, names in TARGETS.items() if getattr(lora, flag) for n in names]
        return [n for n in self.info.lora_targets if n in wanted]

    def _new_adamw(self, params: dict[str, torch.nn.Parameter]) -> torch.optim.AdamW:
        # fused: one kernel for all of a tenant's small LoRA tensors; CPU/MPS keep torch's default.
        return torch.optim.AdamW(params.values(), lr=0.0, fused=True if self.info.device == "cuda" else None)

    def _inject(self, adapter: str, config: LoraConfig, targets: list[str], seed: int) -> dict[str, torch.nn.Parameter]:
        """Add an adapter whose init depends on `seed` alone, not on the global RNG or other
        tenants; returns its parameters by stable name (the adapter's name removed), in the
        model's module order.

        When every module it targets already carries peft's LoRA layer (another tenant targets
        it too: the usual case), the adapter is added to those layers directly
        (`_add_to_layers`), which is what peft's `add_adapter` does for them after a walk over
        every module and parameter of the model (and a second one to set the active adapter
        again). That walk grows with the tenants: on a 36-layer model (Qwen3-8B's depth) it was
        0.5 s with 16 tenants and 2.4 s with 64, all on the compute thread. The result is the
        same, to the bit: tests/trainer/test_tenants.py compares the two ways."""
        cuda_devices = list(range(torch.cuda.device_count()))
        # peft builds LoRA layers on CPU and inits them from the global CPU generator, then moves
        # them; fork_rng keeps the caller's RNG streams untouched.
        with torch.random.fork_rng(devices=cuda_devices), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tied lm_head, gradient-checkpointing deprecations
            torch.manual_seed(seed % 2**64)  # any Python int is a valid seed
            layers = self._lora_layers_of(targets) if self.direct_layers else None
            if layers is not None:
                return self._add_to_layers(adapter, config, layers)
            if self.peft is None:
                self.peft = get_peft_model(self.model, config, adapter_name=adapter)
                self._active = adapter
            else:
                # Leaves the active adapter as it was (peft re-applies its requires_grad flags).
                self.peft.add_adapter(adapter, config)
        self._lora_layers = self._lora_keys = None  # the adapter may target modules no earlier one did
        self._eval()
        return {name.replace(f".{adapter}.", "."): p for name, p in self.peft.named_parameters() if f".{adapter}." in name}

    def _lora_layers_of(self, targets: list[str]) -> list[tuple[str, torch.nn.Module]] | None:
        """(module name, peft LoRA layer) for every module `targets` selects, in module order, as
        peft's matching selects them (the name, or a name ending in "." + it); None when one of
        them is not a LoRA layer yet, or the model has other peft wrappers (`_peft_layers`)."""
        if self.peft is None or self._peft_layers() is None:  # lists self._lora_keys too
            return None
        wanted, suffixes = set(targets), tuple("." + t for t in targets)
        keys = [k for k in self._module_keys if k in wanted or k.endswith(suffixes)]
        if not keys or any(k not in self._lora_keys for k in keys):
            return None
        return [(k, self._lora_keys[k]) for k in keys]

    def _add_to_layers(self, adapter: str, config: LoraConfig, layers: list[tuple[str, torch.nn.Module]]) -> dict[str, torch.nn.Parameter]:
        """peft's add_adapter for modules that are LoRA layers already, without its walks: the
        config registered, each layer's `update_layer` (in module order, so the RNG is drawn as
        peft draws it), its adapter dtype cast as peft casts it (bf16 -> float32), the new modules
        in eval mode like the rest. Each layer's update sets its adapters' requires_grad as peft's
        own walk does (the active adapter's on, the others' off). peft's list of targeted module
        names has these modules already (it records a module when it first wraps it and never
        removes one). On an error, whatever was added is removed again."""
        self.peft.peft_config[adapter] = config
        done: list[torch.nn.Module] = []
        try:
            for key, layer in layers:
                done.append(layer)
                layer.update_layer(adapter, config.r, lora_alpha=config.lora_alpha, target_name=key, config=config)
                for part in layer.adapter_layer_names:  # lora_A, lora_B (and peft's embedding/variant dicts)
                    modules = getattr(layer, part)
                    if adapter in modules:
                        _upcast(modules[adapter])
                        modules[adapter].train(False)
                layer.lora_dropout[adapter].train(False)
        except BaseException:
            for layer in done:
                layer.delete_adapter(adapter)
            del self.peft.peft_config[adapter]
            raise
        prefix = "base_model.model."
        params: dict[str, torch.nn.Parameter] = {}
        for key, layer in layers:
            for part in ("lora_A", "lora_B"):
                for name, p in getattr(layer, part)[adapter].named_parameters():
                    params[f"{prefix}{key}.{part}.{name}"] = p
        return params

    def has(self, model_id: str) -> bool:
        return model_id in self._tenants

    def drop(self, model_id: str) -> None:
        tenant = self._tenant(model_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "adapter was active which is now deleted"
            layers = self._peft_layers() if self.direct_layers else None
            if layers is not None:
                self._remove_from_layers(tenant.adapter, layers)  # the LoRA layers stay: the lists stay valid
            else:
                self.peft.delete_adapter(tenant.adapter)
                self._lora_layers = self._lora_keys = None
        self._active = None  # peft picks a new active adapter when the active one goes
        del self._tenants[model_id]
        log.info("tenant_dropped", model_id=model_id, adapter=tenant.adapter)

    def _remove_from_layers(self, adapter: str, layers: list) -> None:
        """peft's delete_adapter without its walk over every module: the config removed, each
        LoRA layer's own `delete_adapter` in module order (a layer whose active adapter goes
        picks another, as peft's does), and the model's active adapter set from the first layer's
        as peft sets it. Only for a model with no peft wrappers but LoRA layers (`_peft_layers`)."""
        base = self.peft.base_model
        del base.peft_config[adapter]
        new_active = None
        for layer in layers:
            layer.delete_adapter(adapter)
            if new_active is None:
                new_active = layer.active_adapters[:]
        base.active_adapter = new_active or []
        if len(self.peft.active_adapters) == 1:
            self.peft.active_adapter = self.peft.active_adapters[0]

    def model_ids(self) -> list[str]:
        return list(self._tenants)

    def adapter_state(self, model_id: str) -> dict[str, torch.Tensor]:
        """CPU copies of the tenant's LoRA weights, keyed as in a saved peft adapter."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self._tenant(model_id).params.items()}

    def adapter_grads(self, model_id: str) -> dict[str, torch.Tensor | None]:
        """CPU copies of the gradients accumulated since the last optim_step (None where none)."""
        params = self._tenant(model_id).params
        return {name: None if p.grad is None else p.grad.to("cpu", copy=True) for name, p in params.items()}

    # ------------------------------------------------------------------ checkpoints

    def export_state(self, model_id: str, *, with_optimizer: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tenant's checkpoint: CPU tensors and string metadata (safetensors-ready).

        Adapter weights are keyed exactly as `adapter_state` (peft keys). With the optimizer,
        also each parameter's AdamW state as "optimizer.<key>.exp_avg", ".exp_avg_sq" (the
        parameter's shape and dtype) and ".step" (float32 scalar); a parameter AdamW has not
        stepped yet is written as its fresh state (zeros, step 0), which AdamW treats the same.
        Pending gradients are not part of a checkpoint."""
        tenant = self._tenant(model_id)
        tensors = self.adapter_state(model_id)
        if with_optimizer:
            for name, p in tenant.params.items():
                state = tenant.opt.state.get(p) or {}
                for moment in _MOMENTS:
                    value = state.get(moment)
                    cpu = torch.zeros(p.shape, dtype=p.dtype) if value is None else value.detach().to("cpu", copy=True)
                    tensors[f"{OPTIMIZER_PREFIX}{name}.{moment}"] = cpu
                step = state.get("step")
                step = torch.zeros(()) if step is None else torch.as_tensor(step).detach().to("cpu", torch.float32, copy=True)
                tensors[f"{OPTIMIZER_PREFIX}{name}.step"] = step.reshape(())
        lora = tenant.lora
        metadata = {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "rank": str(lora.rank),
            "seed": str(lora.seed),
            **{flag: _bool_str(getattr(lora, flag)) for flag in _FLAGS},
            "lora_alpha": str(self.info.lora_alpha),
            "target_modules": json.dumps(self._targets(lora)),
            "base_model": self.info.model_name,
            "base_arch": self.info.arch,
            "vocab_size": str(self.info.vocab_size),
            "dtype": self.info.dtype,
            "optimizer": "adamw" if with_optimizer else "none",
        }
        return tensors, metadata

    def import_state(
        self, model_id: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, with_optimizer: bool
    ) -> None:
        """Load a checkpoint into an existing tenant. Everything is checked before anything
        changes (an `InvalidRequest` leaves the tenant as it was): format, rank, targets and
        base model, every key present with the parameter's shape and finite values, and the
        optimizer state when `with_optimizer`. Then the weights are copied in; with_optimizer
        restores AdamW's moments and step exactly, otherwise the optimizer starts fresh.
        Pending (accumulated) gradients are dropped either way."""
        tenant = self.check_state(model_id, tensors, metadata, with_optimizer=with_optimizer)
        self._load_state(tenant, tensors, with_optimizer=with_optimizer)
        log.info("tenant_state_loaded", model_id=model_id, adapter=tenant.adapter, optimizer=with_optimizer)

    def check_state(
        self, model_id: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, with_optimizer: bool
    ) -> _Tenant:
        """Every check of `import_state`, changing nothing: InvalidRequest if it would refuse."""
        tenant = self._tenant(model_id)
        meta = _parse_state_metadata(metadata)
        self._check_compatible(tenant, meta)
        if with_optimizer and meta.optimizer != "adamw":
            raise InvalidRequest("checkpoint was saved without optimizer state; load it without the optimizer")
        weight_keys = set(tenant.params)
        opt_keys = {f"{OPTIMIZER_PREFIX}{name}.{part}" for name in tenant.params for part in (*_MOMENTS, "step")}
        need = weight_keys | (opt_keys if with_optimizer else set())
        allowed = weight_keys | (opt_keys if meta.optimizer == "adamw" else set())
        missing, unknown = sorted(need - set(tensors)), sorted(set(tensors) - allowed)
        if missing:
            raise InvalidRequest(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unknown:
            raise InvalidRequest(f"checkpoint has {len(unknown)} unexpected tensor(s), e.g. {unknown[:3]}")
        for name, p in tenant.params.items():
            _check_state_tensor(tensors[name], name, p.shape)
            if with_optimizer:
                for moment in _MOMENTS:
                    key = f"{OPTIMIZER_PREFIX}{name}.{moment}"
                    _check_state_tensor(tensors[key], key, p.shape)
                key = f"{OPTIMIZER_PREFIX}{name}.exp_avg_sq"
                if (tensors[key] < 0).any():
                    raise InvalidRequest(f"checkpoint tensor {key!r} has negative values")
                key = f"{OPTIMIZER_PREFIX}{name}.step"
                _check_state_tensor(tensors[key], key, None)
                step = tensors[key].double().item()
                if step < 0 or step != int(step):
                    raise InvalidRequest(f"checkpoint tensor {key!r} must be a whole number >= 0, got {step}")
        return tenant

    def _load_state(self, tenant: _Tenant, tensors: dict[str, torch.Tensor], *, with_optimizer: bool) -> None:
        """Copy a checked checkpoint in: from here nothing can refuse."""
        opt = self._new_adamw(tenant.params)
        fused = bool(opt.param_groups[0].get("fused")) or bool(opt.param_groups[0].get("capturable"))
        step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        with torch.no_grad():
            for name, p in tenant.params.items():
                p.copy_(tensors[name])
                p.grad = None
                if with_optimizer:
                    # As AdamW itself lays out its state: moments like the parameter, step a
                    # scalar on the parameter's device when fused/capturable, else on the CPU.
                    moments = {
                        m: tensors[f"{OPTIMIZER_PREFIX}{name}.{m}"].to(p.device, p.dtype, copy=True).contiguous()
                        for m in _MOMENTS
                    }
                    step = tensors[f"{OPTIMIZER_PREFIX}{name}.step"].double().item()
                    device = p.device if fused else torch.device("cpu")
                    opt.state[p] = {"step": torch.tensor(step, dtype=step_dtype, device=device), **moments}
        tenant.opt = opt

    def _check_compatible(self, tenant: _Tenant, meta: _StateMeta) -> None:
        info, targets = self.info, tuple(self._targets(tenant.lora))
        if meta.arch != info.arch or meta.vocab_size != info.vocab_size:
            raise InvalidRequest(
                f"checkpoint is for a {meta.arch} base with vocab {meta.vocab_size}, "
                f"this trainer serves {info.arch} with vocab {info.vocab_size}"
            )
        if meta.lora_alpha != info.lora_alpha:
            raise InvalidRequest(f"checkpoint lora_alpha {meta.lora_alpha} differs from this trainer's {info.lora_alpha}")
        if meta.lora.rank != tenant.lora.rank:
            raise InvalidRequest(f"checkpoint lora rank {meta.lora.rank} differs from the model's rank {tenant.lora.rank}")
        if sorted(meta.targets) != sorted(targets):
            raise InvalidRequest(
                f"checkpoint lora targets {list(meta.targets)} differ from the model's targets {list(targets)}"
            )

    def peft_files(self, model_id: str) -> dict[str, bytes]:
        """The tenant's adapter as a standard peft folder, {filename: bytes}:
        "adapter_model.safetensors" and "adapter_config.json", loadable with
        `PeftModel.from_pretrained(base_model, folder)` (base = `info.model_name`)."""
        tenant = self._tenant(model_id)
        weights = {k: v.contiguous() for k, v in self.adapter_state(model_id).items()}
        config = LoraConfig(
            r=tenant.lora.rank,
            lora_alpha=self.info.lora_alpha,
            lora_dropout=0.0,
            target_modules=self._targets(tenant.lora),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.info.model_name,
            inference_mode=True,
        ).to_dict()
        config = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}
        return {
            "adapter_model.safetensors": safetensors_save(weights, metadata={"format": "pt"}),
            "adapter_config.json": (json.dumps(config, indent=2, sort_keys=True, default=str) + "\n").encode(),
        }

    def _tenant(self, model_id: str) -> _Tenant:
        tenant = self._tenants.get(model_id)
        if tenant is None:
            raise NotFound(f"model {model_id!r} not found on this trainer")
        return tenant

    def _activate(self, tenant: _Tenant) -> None:
        """Make the tenant's adapter the active one. peft's set_adapter walks every module and sets
        requires_grad on every adapter of every layer (5 ms a switch on the default model, and
        more with each tenant); a switch from a tenant held here does what it does to the two
        adapters that change (their parameters' requires_grad; each LoRA layer's active adapter,
        on peft's layers listed once: `_peft_layers`)."""
        if self._active == tenant.adapter:
            return
        old = next((t for t in self._tenants.values() if t.adapter == self._active), None)
        layers = self._peft_layers()
        if old is None or layers is None:  # none active, or a dropped one: peft's own walk
            self.peft.set_adapter(tenant.adapter)
        else:
            for p in old.params.values():
                if p.is_leaf:
                    p.requires_grad_(False)
            for p in tenant.params.values():
                if p.is_leaf:
                    p.requires_grad_(True)
            for layer in layers:
                layer._active_adapter = [tenant.adapter]
            self.peft.active_adapter = self.peft.base_model.active_adapter = tenant.adapter  # as PeftModel.set_adapter sets both
        self._active = tenant.adapter

    def _peft_layers(self) -> list | None:
        """peft's LoRA layers in module order (listed once per set of adapters, with
        `_lora_keys`: the same by module name), or None where the model also has other adapter
        wrappers (modules_to_save, trainable tokens: never configured here), whose switches
        peft's own calls handle."""
        if self._lora_layers is None:
            from peft.tuners.tuners_utils import AuxiliaryTrainingWrapper, BaseTunerLayer

            named = list(self.peft.base_model.model.named_modules())
            if any(isinstance(m, AuxiliaryTrainingWrapper) for _, m in named):
                return None
            self._lora_keys = {k: m for k, m in named if isinstance(m, BaseTunerLayer)}
            self._lora_layers = list(self._lora_keys.values())
        return self._lora_layers

    # ------------------------------------------------------------------ compute

    def forward_backward(self, req: ForwardBackward) -> FwdBwdResult:
        steps = self.forward_backward_steps(req)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def pausable(self, tokens: int) -> bool:
        """Whether a pass of `tokens` may pause inside (pauses.py) when run by
        `forward_backward_steps`: the trainer steps such a request even if it is one micro-batch."""
        return self._pauses is not None and tokens >= PREEMPT_MIN_TOKENS

    @property
    def pauses(self) -> int:
        """Pauses inside passes so far."""
        return self._pauses.pauses if self._pauses is not None else 0

    def forward_backward_steps(self, req: ForwardBackward) -> Generator[int, None, FwdBwdResult]:
        """`forward_backward` one micro-batch at a time: yields the tokens of each micro-batch run,
        returns the result. Between two steps the caller may run other models' calls (the trainer
        does, so that one big request does not hold the thread for all its passes): every step
        makes this model's adapter the active one again, and its gradients stay in a local list
        until the last step adds them to `.grad`, so no other call sees or touches them. With more
        than one rank nothing is yielded (the ranks' collectives must line up).

        A micro-batch that may pause (`pausable`) also yields (0) inside its pass, at a block's
        boundary once its slice is spent (pauses.py); it makes its adapter active again when it
        goes on."""
        tenant = self._tenant(req.model_id)
        signature = requests.check_loss_fn(req.loss_fn)
        config = requests.check_config(req.loss_fn, signature, req.loss_fn_config)
        batch = requests.parse(req.data, req.loss_fn, signature, config, self.info.vocab_size, self.info.max_context)
        if not batch.tokens_D:
            return FwdBwdResult(logprobs=[], metrics={"loss:sum": 0.0, "tokens:sum": 0.0})
        self._activate(tenant)
        params = list(tenant.params.values())
        logprobs: dict[int, np.ndarray] = {}
        grads: list[torch.Tensor | None] = [None] * len(params)
        loss_sum = 0.0
        plan = requests.micro_batches(batch.lengths, self.microbatch_tokens)
        mine = plan[self.rank :: self.world]
        passes = -(-len(plan) // self.world)  # every rank the same number, so collectives line up
        with self._unsharded_root():
            for k in range(passes):
                if k and self.world == 1:
                    yield sum(batch.lengths[i] for i in mine[k - 1])
                    self._activate(tenant)  # another model's call may have run meanwhile
                idx = mine[k] if k < len(mine) else None
                if not idx:
                    with torch.inference_mode() if req.forward_only else contextlib.nullcontext():
                        _, loss = self._idle_pass()
                    if not req.forward_only:
                        _add(grads, torch.autograd.grad(loss, params, allow_unused=True))
                    continue
                def one_pass(idx=idx):
                    if req.forward_only:
                        with torch.inference_mode():
                            return self._loss(req.loss_fn, batch, idx, config)
                    return self._loss(req.loss_fn, batch, idx, config, grads=grads, params=params)

                if self.pausable(len(idx) * max(batch.lengths[i] for i in idx)):  # never in a group: no _pauses there
                    lp_M_K, loss = yield from self._pauses.run(one_pass, on_resume=lambda: self._activate(tenant))
                else:
                    lp_M_K, loss = one_pass()
                loss_sum += loss.item()
                rows_D = np.split(lp_M_K.detach().cpu().numpy(), np.cumsum([len(batch.tokens_D[i]) for i in idx])[:-1])
                for i, rows in zip(idx, rows_D):
                    shape = batch.inputs_D[i]["target_tokens"].shape
                    # Drop the K padding; 1-D targets give 1-D logprobs.
                    logprobs[i] = np.ascontiguousarray(rows[:, 0] if len(shape) == 1 else rows[:, : shape[1]])
                del lp_M_K, loss
        if self.world > 1:
            loss_sum, logprobs = self._reduce(grads, loss_sum, logprobs, with_grads=not req.forward_only)
        if not req.forward_only:
            self._accumulate(params, grads, loss_sum)
        metrics = {"loss:sum": loss_sum, "tokens:sum": float(sum(batch.lengths))}
        return FwdBwdResult(logprobs=[logprobs.get(i) for i in range(len(batch.tokens_D))], metrics=metrics)

    def forward_backward_many(self, reqs: list[ForwardBackward]) -> list[FwdBwdResult | InvalidRequest]:
        """Several tenants' requests (at most one per model, all forward-only or all not) in
        shared micro-batches: each row goes through its own tenant's adapter (LoRA slots routed
        per row, openrl/lora_slots.py, with the tenants' own parameters as the weights, so
        autograd brings each tenant its own gradients). One result or InvalidRequest per request,
        in order; each equals what the request gets alone (float noise: the sums group
        differently). A request that fails its checks, or whose gradients are not finite, fails
        alone and changes nothing; the others go on. A backward that recomputes a forward
        (activation checkpointing, logits in several chunks) recomputes it on the same route
        (`_checkpoint_contexts`). In a trainer group, or for one request, each runs alone
        (`forward_backward`)."""
        out: list[FwdBwdResult | InvalidRequest | None] = [None] * len(reqs)
        if self.world > 1 or len(reqs) < 2 or len({r.model_id for r in reqs}) < len(reqs) or len({r.forward_only for r in reqs}) > 1:
            return [self._one(r) for r in reqs]
        jobs = []  # (position, request, tenant, batch, config)
        for pos, req in enumerate(reqs):
            try:
                tenant = self._tenant(req.model_id)
                signature = requests.check_loss_fn(req.loss_fn)
                config = requests.check_config(req.loss_fn, signature, req.loss_fn_config)
                batch = requests.parse(req.data, req.loss_fn, signature, config, self.info.vocab_size, self.info.max_context)
            except InvalidRequest as e:
                out[pos] = e
                continue
            if not batch.tokens_D:
                out[pos] = FwdBwdResult(logprobs=[], metrics={"loss:sum": 0.0, "tokens:sum": 0.0})
                continue
            jobs.append((pos, req, tenant, batch, config))
        if len(jobs) < 2:
            for pos, req, *_ in jobs:
                out[pos] = self._one(req)
            return out
        forward_only = reqs[0].forward_only
        slots = self._tenant_slots()
        params_J = [list(t.params.values()) for _, _, t, _, _ in jobs]
        grads_J: list[list[torch.Tensor | None]] = [[None] * len(ps) for ps in params_J]
        loss_J = [0.0] * len(jobs)
        logprobs_J: list[dict[int, np.ndarray]] = [{} for _ in jobs]
        entries = [(j, i) for j, (_, _, _, batch, _) in enumerate(jobs) for i in range(len(batch.tokens_D))]
        lengths = [len(jobs[j][3].tokens_D[i]) for j, i in entries]
        for plan in requests.micro_batches(lengths, self.microbatch_tokens):
            members = [entries[k] for k in plan]
            tokens_B = [jobs[j][3].tokens_D[i] for j, i in members]
            ids_B_T = np.zeros((len(members), max(map(len, tokens_B))), dtype=np.int64)
            for row, tokens in enumerate(tokens_B):
                ids_B_T[row, : len(tokens)] = tokens
            by_job: dict[int, list[int]] = {}
            for row, (j, _) in enumerate(members):
                by_job.setdefault(j, []).append(row)
            device = self.info.device
            segments = [Segment(rows=torch.tensor(rows, device=device), weights=self._weights_of(jobs[j][2])) for j, rows in by_job.items()]
            involved = [p for j in by_job for p in params_J[j]]
            with torch.inference_mode() if forward_only else contextlib.nullcontext(), self._adapters_off(involved):
                with slots.route_segments(segments):
                    hidden_B_T_H = self._decoder(input_ids=torch.from_numpy(ids_B_T).to(device), use_cache=False).last_hidden_state
                total = None
                for j, rows in by_job.items():
                    _, _, tenant, batch, config = jobs[j]
                    idx = [members[r][1] for r in rows]
                    real = torch.zeros((len(rows), ids_B_T.shape[1]), dtype=torch.bool)
                    for k, i in enumerate(idx):
                        real[k, : len(batch.tokens_D[i])] = True
                    hidden_M_H = hidden_B_T_H[torch.tensor(rows, device=device)][real.to(device)]
                    x = {name: torch.from_numpy(values).to(device) for name, values in batch.inputs(idx).items()}
                    targets_M_K = x.pop("target_tokens")
                    with slots.route_segments([Segment(rows=None, weights=self._weights_of(tenant))]):
                        lp_M_K = self._logprobs(hidden_M_H, targets_M_K)
                    loss = losses.total(jobs[j][1].loss_fn, lp_M_K if batch.signature.top_k else lp_M_K[:, 0], x, config)
                    loss_J[j] += loss.item()
                    total = loss if total is None else total + loss
                    rows_D = np.split(lp_M_K.detach().cpu().numpy(), np.cumsum([len(batch.tokens_D[i]) for i in idx])[:-1])
                    for i, lp in zip(idx, rows_D):
                        shape = batch.inputs_D[i]["target_tokens"].shape
                        logprobs_J[j][i] = np.ascontiguousarray(lp[:, 0] if len(shape) == 1 else lp[:, : shape[1]])
                if not forward_only:
                    got = torch.autograd.grad(total, involved, allow_unused=True)
                    offset = 0
                    for j in by_job:
                        _add(grads_J[j], got[offset : offset + len(params_J[j])])
                        offset += len(params_J[j])
        for j, (pos, req, _, batch, _) in enumerate(jobs):
            if not forward_only:
                try:
                    self._accumulate(params_J[j], grads_J[j], loss_J[j])
                except InvalidRequest as e:
                    out[pos] = e
                    continue
            metrics = {"loss:sum": loss_J[j], "tokens:sum": float(sum(batch.lengths))}
            out[pos] = FwdBwdResult(logprobs=[logprobs_J[j].get(i) for i in range(len(batch.tokens_D))], metrics=metrics)
        return out

    def _one(self, req: ForwardBackward) -> FwdBwdResult | InvalidRequest:
        try:
            return self.forward_backward(req)
        except InvalidRequest as e:
            return e

    def _checkpoint_contexts(self):
        """torch.utils.checkpoint's `context_fn` for every recompute here (the decoder layers'
        activation checkpointing, the logits' chunks): in a shared pass the route of the
        forward, put back around its recompute in the backward pass; elsewhere nothing."""
        if self._slots is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return self._slots.checkpoint_contexts()

    def _tenant_slots(self) -> LoraSlots:
        """Slot routing on the base Linear under each of peft's LoRA layers (made once; layers
        that peft adds later for new targets are wrapped when first needed)."""
        if self._slots is None:
            self._slots = LoraSlots(self.peft, num_slots=1, rank=1, max_rank=MAX_RANK)
        self._slots.dense_segments = self.dense_shared_passes
        new = {
            n: m for n, m in self.peft.named_modules()
            if n.endswith(".base_layer") and isinstance(m, torch.nn.Linear) and n not in self._slots.layers
        }  # fmt: skip
        self._slots.linears.update(new)
        self._slots.wrap(list(new))
        return self._slots

    def _weights_of(self, tenant: _Tenant):
        """Per wrapped base layer: the tenant's (lora_A, lora_B, scale) leaves, or None."""
        params, scale = tenant.params, self.info.lora_alpha / tenant.lora.rank

        def weights(name: str):
            stem = name.removesuffix(".base_layer")
            a = params.get(f"{stem}.lora_A.weight")
            return None if a is None else (a, params[f"{stem}.lora_B.weight"], scale)

        return weights

    @contextlib.contextmanager
    def _adapters_off(self, params: list[torch.nn.Parameter]):
        """peft's own LoRA terms off (the routed slots supply them) and the batch's leaves
        requiring gradients; both as they were on leaving. The flag that peft's disable_adapter
        sets is set here directly on each of peft's LoRA layers (listed once per set of
        adapters): disable_adapter also computes peft's model status (a repr of every layer) and
        resets every adapter's requires_grad, walking the model twice, which took 40 ms of each
        shared call on the default model, a fifth of it. Other adapters' parameters keep their
        flags: with the layers off no forward reaches them."""
        layers = self._peft_layers()
        if layers is None:  # other wrapper kinds: peft's own way, whatever it costs
            with self.peft.disable_adapter():
                for p in params:
                    p.requires_grad_(True)
                yield
            return
        flags = [p.requires_grad for p in params]
        off = [layer.disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        for p in params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for layer, was in zip(layers, off):
                layer._disable_adapters = was
            for p, was in zip(params, flags):
                p.requires_grad_(was)

    def _idle_pass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A one-token pass whose loss is 0 and gradients are zeros: a rank with no micro-batch
        left runs it so that it joins the same FSDP collectives as the ranks that have one."""
        hidden = self._decoder(input_ids=torch.zeros((1, 1), dtype=torch.int64, device=self.info.device), use_cache=False)
        lp = self._logprobs(hidden.last_hidden_state[0], torch.zeros((1, 1), dtype=torch.int64, device=self.info.device))
        return lp, lp.sum() * 0.0

    @contextlib.contextmanager
    def _unsharded_root(self):
        """With FSDP2, the root's own parameters (embeddings, final norm, head) gathered for the
        whole request: the decoder and the head are called directly, not through the root's
        forward, whose hook would gather them."""
        if self.world == 1:
            yield
            return
        self.model.unshard()
        try:
            yield
        finally:
            self.model.reshard()

    def _reduce(
        self, grads: list[torch.Tensor | None], loss_sum: float, logprobs: dict[int, np.ndarray], *, with_grads: bool
    ) -> tuple[float, dict[int, np.ndarray]]:
        """Sum gradients (in place) and the loss over the group; rank 0 gets every datum's logprobs."""
        device = self.info.device
        present = [g for g in grads if g is not None] if with_grads else []
        flat = torch.cat([g.reshape(-1) for g in present] + [torch.tensor([loss_sum], dtype=torch.float32, device=device)])
        dist.all_reduce(flat)
        offset = 0
        for g in present:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        gathered: list[dict[int, np.ndarray]] | None = [{} for _ in range(self.world)] if self.rank == 0 else None
        dist.gather_object(logprobs, gathered, dst=0)
        merged = {i: a for part in gathered for i, a in part.items()} if gathered else {}
        return flat[-1].item(), merged

    def _loss(
        self, loss_fn: str, batch: requests.Batch, idx: list[int], config: dict[str, float],
        grads: list[torch.Tensor | None] | None = None, params: list[torch.nn.Parameter] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded forward of the datums `idx`; returns (lp of their real positions (M, K),
        their summed loss). With `grads`, also its backward: the gradients of `params` are
        added to `grads`."""  # fmt: skip
        tokens_D = [batch.tokens_D[i] for i in idx]
        ids_B_T = np.zeros((len(tokens_D), max(len(t) for t in tokens_D)), dtype=np.int64)
        real_B_T = np.zeros(ids_B_T.shape, dtype=bool)
        for row, tokens in enumerate(tokens_D):
            ids_B_T[row, : len(tokens)] = tokens
            real_B_T[row, : len(tokens)] = True
        device = self.info.device
        # Right padding under a causal mask: real positions never attend to the pads after
        # them, so no attention_mask is needed and SDPA keeps its fast is_causal path.
        hidden_B_T_H = self._decoder(input_ids=torch.from_numpy(ids_B_T).to(device), use_cache=False).last_hidden_state
        hidden_M_H = hidden_B_T_H[torch.from_numpy(real_B_T).to(device)]
        x = {name: torch.from_numpy(values).to(device) for name, values in batch.inputs(idx).items()}
        targets_M_K = x.pop("target_tokens")
        signature = batch.signature
        if grads is not None and signature.sequence_mask is None and len(hidden_M_H) > self._chunk_rows:
            return self._chunked_backward(loss_fn, signature, hidden_M_H, targets_M_K, x, config, grads, params)
        lp_M_K = self._logprobs(hidden_M_H, targets_M_K)
        lp_M = lp_M_K if signature.top_k else lp_M_K[:, 0]
        loss = losses.total(loss_fn, lp_M, x, config)
        if grads is not None:
            _add(grads, torch.autograd.grad(loss, params, allow_unused=True))
        return lp_M_K, loss

    def _chunked_backward(
        self, loss_fn: str, signature: losses.Signature, hidden_M_H: torch.Tensor, targets_M_K: torch.Tensor,
        x: dict[str, torch.Tensor], config: dict[str, float], grads: list[torch.Tensor | None],
        params: list[torch.nn.Parameter],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of a loss whose terms are per token, a chunk of positions at a
        time: each chunk's logits are made once, differentiated at once (into the hidden
        states' gradient and the head's adapter) and freed, then one backward carries the
        hidden states' gradient through the decoder. The same sums as the whole loss's backward,
        without recomputing the logits (the checkpointed path for per-sequence losses does)."""  # fmt: skip
        head = self.model.get_output_embeddings()
        rows = self._chunk_rows
        hidden_detached = hidden_M_H.detach()
        grad_M_H = torch.zeros_like(hidden_detached)
        lp_parts, loss = [], torch.zeros((), dtype=torch.float32, device=hidden_M_H.device)
        for start in range(0, len(hidden_M_H), rows):
            chunk = slice(start, start + rows)
            h_C_H = hidden_detached[chunk].requires_grad_(True)
            lp_C_K = self._head_logprobs(head, h_C_H, targets_M_K[chunk])
            lp_C = lp_C_K if signature.top_k else lp_C_K[:, 0]
            loss_C = losses.total(loss_fn, lp_C, {k: v[chunk] for k, v in x.items()}, config)
            g = torch.autograd.grad(loss_C, [h_C_H, *params], allow_unused=True)
            if g[0] is not None:
                grad_M_H[chunk] = g[0]
            _add(grads, g[1:])
            lp_parts.append(lp_C_K.detach())
            loss = loss + loss_C.detach()
        if hidden_M_H.requires_grad:  # adapters in the decoder (not only on the head)
            _add(grads, torch.autograd.grad(hidden_M_H, params, grad_outputs=grad_M_H, allow_unused=True))
        return torch.cat(lp_parts), loss

    def _head_logprobs(self, head: torch.nn.Module, h_C_H: torch.Tensor, t_C_K: torch.Tensor) -> torch.Tensor:
        pause_point()  # a chunk of the head: a boundary where a long pass may pause (pauses.py)
        logits_C_V = head(h_C_H).float()  # fp32 log_softmax, as F.cross_entropy computes it
        if self._softcap:
            logits_C_V = self._softcap * torch.tanh(logits_C_V / self._softcap)
        return torch.log_softmax(logits_C_V, dim=-1).gather(1, t_C_K)  # one gather: (N,) and (N, K)

    def _logprobs(self, hidden_M_H: torch.Tensor, targets_M_K: torch.Tensor) -> torch.Tensor:
        """log_softmax(head(hidden))[targets] in chunks of positions: fp32 logits exist for one
        chunk at a time, and with gradients each chunk is recomputed in the backward pass
        instead of kept (torch.utils.checkpoint, on the route the chunk was made on)."""
        # The head is looked up each time: peft may wrap it.
        chunk = functools.partial(self._head_logprobs, self.model.get_output_embeddings())

        rows = self._chunk_rows
        if len(hidden_M_H) <= rows:
            return chunk(hidden_M_H, targets_M_K)
        parts = []
        for start in range(0, len(hidden_M_H), rows):
            h, t = hidden_M_H[start : start + rows], targets_M_K[start : start + rows]
            grad = torch.is_grad_enabled()  # the head may hold LoRA weights even if h needs no grad
            parts.append(
                torch.utils.checkpoint.checkpoint(chunk, h, t, use_reentrant=False, context_fn=self._checkpoint_contexts)
                if grad else chunk(h, t)
            )  # fmt: skip
        return torch.cat(parts)

    def _accumulate(self, params: list[torch.nn.Parameter], grads: list[torch.Tensor | None], loss: float) -> None:
        """Add a request's gradients to `.grad`, all or nothing: gradients that are not finite
        are refused before they reach `.grad` (one NaN would make every later step NaN)."""
        present = [g for g in grads if g is not None]
        if present and not torch.isfinite(torch.nn.utils.get_total_norm(present)):
            raise InvalidRequest(
                f"the loss's gradients are not finite (loss {loss}); nothing was applied. "
                "Usually logprobs far from the model's own make exp(lp - logprobs) overflow: "
                "check that logprobs are the sampler's logprobs of target_tokens"
            )
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    def optim_step(self, model_id: str, adam: AdamParams) -> dict[str, float]:
        tenant = self._tenant(model_id)
        requests.check_adam(adam)
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


# ---------------------------------------------------------------------- checkpoints


def _bool_str(value: bool) -> str:
    return "true" if value else "false"


def lora_spec_of(metadata: dict[str, str]) -> LoraSpec:
    """The LoraSpec a checkpoint was made with (to create the tenant before import_state)."""
    return _parse_state_metadata(metadata).lora


def _parse_state_metadata(metadata: dict[str, str] | None) -> _StateMeta:
    if not isinstance(metadata, dict) or metadata.get("format") != STATE_FORMAT:
        raise InvalidRequest(f"not an OpenRL training checkpoint (metadata format is not {STATE_FORMAT!r})")
    version = metadata.get("format_version")
    if version != STATE_VERSION:
        raise InvalidRequest(f"checkpoint format_version {version!r} is not supported (this trainer reads {STATE_VERSION!r})")

    def field(key: str) -> str:
        value = metadata.get(key)
        if not isinstance(value, str):
            raise InvalidRequest(f"checkpoint metadata lacks {key!r}")
        return value

    def integer(key: str) -> int:
        value = field(key)
        try:
            return int(value)
        except ValueError:
            raise InvalidRequest(f"checkpoint metadata {key!r} must be an integer, got {value!r}") from None

    flags = {}
    for flag in _FLAGS:
        value = field(flag)
        if value not in ("true", "false"):
            raise InvalidRequest(f"checkpoint metadata {flag!r} must be 'true' or 'false', got {value!r}")
        flags[flag] = value == "true"
    try:
        targets = json.loads(field("target_modules"))
    except json.JSONDecodeError:
        targets = None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        got = metadata["target_modules"]
        raise InvalidRequest(f"checkpoint metadata 'target_modules' must be a JSON list of names, got {got!r}")
    optimizer = field("optimizer")
    if optimizer not in ("adamw", "none"):
        raise InvalidRequest(f"checkpoint optimizer {optimizer!r} is not supported (adamw or none)")
    rank = integer("rank")
    if not 1 <= rank <= MAX_RANK:
        raise InvalidRequest(f"checkpoint lora rank must be in [1, {MAX_RANK}], got {rank}")
    return _StateMeta(
        lora=LoraSpec(rank=rank, seed=integer("seed"), **flags),
        lora_alpha=integer("lora_alpha"),
        targets=tuple(targets),
        arch=field("base_arch"),
        vocab_size=integer("vocab_size"),
        optimizer=optimizer,
    )


def _check_state_tensor(t: object, key: str, shape: torch.Size | None) -> None:
    """A checkpoint tensor: floating point, `shape` (a scalar when None), every value finite."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise InvalidRequest(f"checkpoint tensor {key!r} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if shape is None:
        if t.numel() != 1:
            raise InvalidRequest(f"checkpoint tensor {key!r} must be a scalar, got shape {list(t.shape)}")
    elif t.shape != shape:
        raise InvalidRequest(f"checkpoint tensor {key!r} has shape {list(t.shape)}, the model's is {list(shape)}")
    if not torch.isfinite(t).all():
        raise InvalidRequest(f"checkpoint tensor {key!r} has non-finite values")


# ---------------------------------------------------------------------- compute helpers


def _upcast(module: torch.nn.Module) -> None:
    """A new adapter's parameters in float32 where the base gave them a narrower float (bf16,
    fp16, fp8), as peft's `cast_adapter_dtype` does (autocast_adapter_dtype, its default); for one
    adapter's modules, where peft's walks every adapter of the layer."""
    for owner in module.modules():
        for name, p in list(owner.named_parameters(recurse=False)):
            if p.dtype.is_floating_point and p.dtype.itemsize < 4:
                setattr(owner, name, torch.nn.Parameter(p.data.to(torch.float32), requires_grad=p.requires_grad))


def _add(total: list[torch.Tensor | None], grads: tuple[torch.Tensor | None, ...]) -> None:
    """total += grads, element-wise, None meaning zero."""
    for k, g in enumerate(grads):
        if g is not None:
            total[k] = g if total[k] is None else total[k].add_(g)


def _add_pause_points(layers: list[torch.nn.Module]) -> None:
    """Hooks that make the boundaries of each decoder layer and of its blocks (attention, MLP:
    the children holding Linear layers) pause points (pauses.py): before one runs forward, and
    in a backward pass when the gradient of its output arrives (before its own backward).
    Outside a pausable pass each costs an attribute lookup."""

    def on_grad(grad: torch.Tensor) -> None:
        pause_point()

    def before(module, args) -> None:
        pause_point()

    def after(module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad and in_pausable_pass():
            hidden.register_hook(on_grad)

    for layer in layers:
        blocks = [c for c in layer.children() if any(isinstance(m, torch.nn.Linear) for m in c.modules())]
        for module in [layer, *blocks]:
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)


def _checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _enable_checkpointing(model, context_fn) -> None:
    """transformers' own activation checkpointing of the decoder layers, non-reentrant (the
    frozen base's inputs need no grad, and FSDP2 hooks stay outside the checkpoint; only
    non-reentrant takes a `context_fn`, which puts a shared pass's route back around the
    recompute)."""
    if not _checkpointed_layers(model):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})


def _shard(model: torch.nn.Module, device: str) -> None:
    """FSDP2 over the default process group: each decoder layer a unit, then the root (the
    embeddings, final norm and head). The parameters move to this rank's device as shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in _checkpointed_layers(model) or model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

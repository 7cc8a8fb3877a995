"""Adapter weights and checkpoints as they leave the trainer.

`adapter_bytes`: safetensors bytes keyed exactly like a saved PEFT adapter
(`base_model.model.<module>.lora_A.weight`), so a sampler, or a user with peft, loads them
as they are. `state_bytes` / `read_state`: a resumable checkpoint (save_state): the same
tensors plus, optionally, AdamW state under "optimizer.<key>.<exp_avg|exp_avg_sq|step>",
with the LoRA config and base model in the safetensors metadata (see `LoraEngine.export_state`).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save

from openrl.bus.errors import InvalidRequest
from openrl.trainer.engine import STATE_FORMAT, LoraEngine


def adapter_bytes(engine: LoraEngine, model_id: str) -> bytes:
    """The tenant's adapter as safetensors bytes (runs on the compute thread)."""
    return save({k: v.contiguous() for k, v in engine.adapter_state(model_id).items()})


def state_bytes(engine: LoraEngine, model_id: str, *, with_optimizer: bool) -> bytes:
    """The tenant's checkpoint as safetensors bytes, metadata included (compute thread)."""
    tensors, metadata = engine.export_state(model_id, with_optimizer=with_optimizer)
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def read_state(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint made by `state_bytes`. Anything else, or bytes
    that are not safetensors at all, raises InvalidRequest. Whether it fits a given tenant
    is `LoraEngine.import_state`'s to check."""
    try:
        tensors = load(bytes(blob))
        metadata = _metadata(blob)
    except Exception as e:  # safetensors raises its own error type for malformed bytes
        raise InvalidRequest(f"not a valid checkpoint: {e}") from None
    if metadata.get("format") != STATE_FORMAT:
        raise InvalidRequest(f"not an OpenRL training checkpoint (metadata format is not {STATE_FORMAT!r})")
    return tensors, metadata


def _metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (load() has already checked the header)."""
    n = int.from_bytes(blob[:8], "little")
    metadata = json.loads(bytes(blob[8 : 8 + n])).get("__metadata__") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata values must be strings")
    return metadata

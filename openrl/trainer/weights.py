"""Adapter weights as they leave the trainer: safetensors bytes keyed exactly like a saved
PEFT adapter (`base_model.model.<module>.lora_A.weight`), so a sampler, or a user with
peft, loads them as they are."""

from __future__ import annotations

from safetensors.torch import save

from openrl.trainer.engine import LoraEngine


def adapter_bytes(engine: LoraEngine, model_id: str) -> bytes:
    """The tenant's adapter as safetensors bytes (runs on the compute thread)."""
    return save({k: v.contiguous() for k, v in engine.adapter_state(model_id).items()})

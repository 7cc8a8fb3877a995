"""A worker's base model, loaded: the device it runs on, its dtype, its weights frozen.

The trainer's engine and the transformers sampler load their base model the same way; this
module, outside both worker packages, says that way once.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def pick_device() -> str:
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 halves memory and is what GPUs train in; CPU/MPS bf16 matmuls are slow or inexact.
    return torch.bfloat16 if device == "cuda" else torch.float32


def load_base(model_path: str, device: str, dtype: torch.dtype, *, move: bool = True) -> torch.nn.Module:
    """The model at `model_path` in `dtype`, its weights frozen, moved to `device` unless
    `move` is False (a sharded trainer moves each rank's shards itself, never the whole model)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    if move:
        model.to(device)
    model.requires_grad_(False)
    return model

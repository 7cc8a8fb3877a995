"""The tiny random-init models the trainer tests compare against plain-torch references.

Fixtures only: nothing imports this module by name (see tests/stack_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

VOCAB = 96  # the tests' modules spell it too, to build token ids below it
_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def _save_tiny(path, config) -> str:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("qwen3"), Qwen3Config(**_SHAPE, head_dim=8, tie_word_embeddings=True))


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("llama"), LlamaConfig(**_SHAPE, tie_word_embeddings=False))

"""The tiny model the vLLM tests (and bench/sampling.py --backend vllm) serve: a random Qwen3
whose attention head size vLLM's CPU attention supports.

vLLM's CPU attention takes head sizes 32, 64, 80, 96, 112, 128, ...; the default tiny model's
is 48. Changing the default model would change its fingerprint, which the demos and many tests
rely on, so the vLLM tests get a second model: 2 layers, head_dim 64, random weights (seeded),
fp32, with the default model's tokenizer and chat template (trained here exactly as the default
model's build trains it, seeded: seconds, so these tests never wait for that build's warm-up;
openrl/default_model.py). It is installed in the test HF cache as `VLLM_MODEL`, the way the
default model is, so `openrl up --base-model openrl-tests/tiny-qwen3-h64` and
`AutoTokenizer.from_pretrained` find it offline. Building it takes a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

VLLM_MODEL = "openrl-tests/tiny-qwen3-h64"
ARCH = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    initializer_range=0.2,  # peaky next-token distributions: greedy runs are not constant
)
SEED = 0
# Where vLLM's environment is: scripts/vllm_env.sh builds it and .ci/run exports its python here.
PYTHON_ENV = "OPENRL_VLLM_PYTHON"
REQUIRED_ENV = "OPENRL_VLLM_REQUIRED"  # "1" (CI): fail instead of skipping without it


def ensure_vllm_model() -> Path:
    """The model's snapshot folder in the HF cache (HF_HOME), built on first use."""
    import random

    import tokenizers
    import torch
    import transformers
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    from openrl import default_model

    key = json.dumps([ARCH, SEED, default_model.VOCAB_SIZE, default_model.SPLIT_PATTERN, default_model.CHAT_TEMPLATE,
                      torch.__version__, transformers.__version__, tokenizers.__version__], sort_keys=True)  # fmt: skip
    revision = hashlib.sha256(key.encode()).hexdigest()[:40]
    repo = Path(constants.HF_HUB_CACHE) / ("models--" + VLLM_MODEL.replace("/", "--"))
    snap = repo / "snapshots" / revision
    if not (snap / "config.json").exists():
        # The default model's tokenizer: its build trains it first thing from random.Random(0).
        tokenizer = default_model._train_tokenizer(random.Random(0), vocab_size=default_model.VOCAB_SIZE)
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        config = Qwen3Config(vocab_size=default_model.VOCAB_SIZE, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=None, torch_dtype="float32", **ARCH)  # fmt: skip
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config).float()
        model.generation_config = GenerationConfig(eos_token_id=[eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")])
        repo.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=repo))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            snap.parent.mkdir(exist_ok=True)
            shutil.rmtree(snap, ignore_errors=True)
            os.replace(tmp, snap)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    ref = repo / "refs" / ".main.tmp"
    ref.write_text(revision)
    os.replace(ref, repo / "refs" / "main")
    return snap


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The python of vLLM's environment; skip without one (fail when OPENRL_VLLM_REQUIRED=1)."""
    python = os.environ.get(PYTHON_ENV, "")
    if not python or not os.access(python, os.X_OK):
        why = f"{PYTHON_ENV} is not set to vLLM's python (build it: bash scripts/vllm_env.sh)" if not python else f"{PYTHON_ENV}={python} is not executable"
        if os.environ.get(REQUIRED_ENV) == "1":
            pytest.fail(f"{why}, and {REQUIRED_ENV}=1")
        pytest.skip(why)
    return python


@pytest.fixture(scope="session")
def vllm_model() -> Path:
    return ensure_vllm_model()


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped of a pytest --junitxml report."""
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}

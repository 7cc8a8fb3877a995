"""What both sampling engines (transformers: hf_engine.py, vLLM: vllm_backend.py) share: the
request they take (`SampleSpec`), the result they give (`SampleResult`), what they tell about
their model (`SamplerInfo`), the limits, and `check_spec`, the checks every engine runs.

A request's sampling parameters are the bus's `SamplingParams` struct, unchanged from the
gateway to the engine (`max_tokens` None: the engine's default). The checks that need no model
are openrl.bus.sampling's (the gateway runs them too); `check_spec` adds the model's own.

Semantics (Tinker's, spec §5.6-5.7): see hf_model.py's docstring. The whole sampler: docs/sampler.md.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import MAX_NUM_SAMPLES, MAX_TENSOR_COLUMNS, MAX_TOPK, SamplingParams
from openrl.bus.sampling import check_params

MAX_RANK = 256
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (as vLLM): logits / 1e-40 overflow
DEFAULT_MAX_TOKENS = 256  # what max_tokens=None means, unless the sampler is configured otherwise


@dataclass
class SampleSpec:
    """One asample request, decoded by the service (spec §3.3, §5.6)."""

    prompt: list[int]
    num_samples: int
    params: SamplingParams = field(default_factory=SamplingParams)
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # what params.max_tokens=None means (the sampler's setting)
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: np.ndarray | None = None  # int [L-1, K] dense, -1 = nothing asked
    prompt_alt_tokens_k: int = 0
    adapter: str | None = None  # the adapter's key (its object name); None = the base model
    owner: str = ""  # the API key the request belongs to: admission is fair between keys (openrl/fair.py)

    # The engines read the sampling parameters through these.
    @property
    def max_tokens(self) -> int:
        return self.default_max_tokens if self.params.max_tokens is None else self.params.max_tokens

    @property
    def temperature(self) -> float:
        return self.params.temperature

    @property
    def top_k(self) -> int:
        return self.params.top_k

    @property
    def top_p(self) -> float:
        return self.params.top_p

    @property
    def cost(self) -> int:
        """What the request costs a key's fair share, in tokens: every row's prompt and budget."""
        return self.num_samples * (len(self.prompt) + self.max_tokens)

    @property
    def seed(self) -> int | None:
        return self.params.seed

    @property
    def stop_strings(self) -> list[str]:
        return self.params.stop_strings

    @property
    def stop_token_ids(self) -> list[int]:
        return self.params.stop_token_ids

    @property
    def stop_at_eos(self) -> bool:
        return self.params.stop_at_eos


@dataclass
class SampledSequence:
    tokens: np.ndarray  # int32 [T], generated ids only
    logprobs: np.ndarray  # float32 [T]
    stop_reason: str  # "stop" | "length"
    topk_tokens: np.ndarray | None = None  # int64 [T, k] when topk_sample_logprobs = k > 0
    topk_logprobs: np.ndarray | None = None  # float32 [T, k]


@dataclass
class SampleResult:
    sequences: list[SampledSequence]  # exactly num_samples
    prompt_logprobs: np.ndarray | None = None  # float32 [L]
    topk_prompt_tokens: np.ndarray | None = None  # int64 [L, k], sentinel cells (0, -99999.0)
    topk_prompt_logprobs: np.ndarray | None = None  # float32 [L, k]
    target_prompt_logprobs: np.ndarray | None = None  # float32 [L-1, K]
    prompt_alt_tokens: np.ndarray | None = None  # int64 [L-1, k]
    prompt_alt_logprobs: np.ndarray | None = None  # float32 [L-1, k]


@dataclass(frozen=True)
class SamplerInfo:
    vocab_size: int  # rows of the input embedding: valid ids are [0, vocab_size)
    max_context: int  # prompt + max_tokens may not exceed it
    eos_token_ids: tuple[int, ...]
    has_tokenizer: bool  # stop_strings need one
    device: str
    dtype: str


def check_spec(spec: SampleSpec, info: SamplerInfo) -> None:
    """Raise InvalidRequest naming the bad field of `spec` for a model described by `info`. No compute.

    Every engine checks this; an engine adds its own limits (and adapter lookup) on top."""
    vocab, n = info.vocab_size, len(spec.prompt)
    if n == 0:
        raise InvalidRequest("prompt is empty")
    _check_ids(spec.prompt, "prompt", vocab)
    if not is_int(spec.num_samples) or not 1 <= spec.num_samples <= MAX_NUM_SAMPLES:
        raise InvalidRequest(f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {spec.num_samples}")
    check_params(spec.params)
    if n + spec.max_tokens > info.max_context:
        which = "sampling_params.max_tokens" if spec.params.max_tokens is not None else "the sampler's default max_tokens"
        raise InvalidRequest(
            f"prompt ({n} tokens) + {which} ({spec.max_tokens}) exceeds the model's context of {info.max_context} tokens"
        )
    _check_ids(spec.stop_token_ids, "sampling_params.stop", vocab)
    if spec.stop_strings and not info.has_tokenizer:
        raise InvalidRequest("sampling_params.stop: stop strings need a tokenizer, and this model has none")
    for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
        k = getattr(spec, name)
        if not is_int(k) or not 0 <= k <= MAX_TOPK:
            raise InvalidRequest(f"{name} must be in [0, {MAX_TOPK}], got {k}")
    last_n = spec.prompt_logprobs_last_n
    if last_n is not None:
        if not (spec.prompt_logprobs or spec.topk_prompt_logprobs):
            raise InvalidRequest("prompt_logprobs_last_n needs prompt_logprobs or topk_prompt_logprobs")
        if not is_int(last_n) or not 1 <= last_n <= n - 1:
            raise InvalidRequest(f"prompt_logprobs_last_n must be in [1, {n - 1}] (prompt length - 1), got {last_n}")
    targets = spec.target_prompt_logprobs
    if targets is not None:
        targets = np.asarray(targets)
        if targets.ndim != 2 or targets.shape[0] != n - 1 or targets.dtype.kind not in "iu":
            raise InvalidRequest(
                f"target_prompt_logprobs must be an integer [len(prompt) - 1, K] = [{n - 1}, K] tensor, "
                f"got {targets.dtype} {list(targets.shape)}"
            )
        if targets.shape[1] > MAX_TENSOR_COLUMNS:
            raise InvalidRequest(f"target_prompt_logprobs: at most {MAX_TENSOR_COLUMNS} columns, got {targets.shape[1]}")
        if targets.size and (targets.min() < -1 or targets.max() >= vocab):
            raise InvalidRequest(f"target_prompt_logprobs: ids must be -1 or in [0, {vocab})")


def wants_prompt_stats(spec: SampleSpec) -> bool:
    return bool(
        spec.prompt_logprobs or spec.topk_prompt_logprobs or spec.prompt_alt_tokens_k or spec.target_prompt_logprobs is not None
    )


def stop_ids(spec: SampleSpec, eos: tuple[int, ...]) -> set[int]:
    """The token ids that end a row: the request's, plus the model's EOS ids unless stop=[]."""
    return set(spec.stop_token_ids) | (set(eos) if spec.stop_at_eos else set())


def eos_ids(model_path: str, model, tokenizer, vocab: int) -> tuple[int, ...]:
    """The tokenizer's eos plus generation_config's eos_token_id (an int or a list).
    `model` needs `generation_config` and `config` only."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except OSError:
        gen = model.generation_config
    ids = set()
    for source in (gen.eos_token_id, tokenizer.eos_token_id if tokenizer is not None else None):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else source)
    if not ids and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        ids.update([eos] if isinstance(eos, int) else eos)
    return tuple(sorted(i for i in ids if 0 <= i < vocab))


def load_tokenizer(model_path: str):
    """The checkpoint's tokenizer, or None for a bare checkpoint (no tokenizer files)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError):
        return None
    # transformers 5 builds an empty tokenizer from the model type when files are missing.
    return tokenizer if len(tokenizer) > 1 else None


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_ids(ids, where: str, vocab: int) -> None:
    arr = np.asarray(ids)
    if arr.size == 0:
        return
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidRequest(f"{where}: token ids must be a list of integers")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
        raise InvalidRequest(f"{where}: token ids must be in [0, {vocab}), got {lo if lo < 0 else hi}")

"""Sampling compute: batched generation with a KV cache over one base model and its LoRA adapters.

Pure compute: no networking, no asyncio, called from a single thread. The sampler service
decodes an `asample` request into a `SampleSpec`, loads the adapter it names (`load_adapter`),
and hands batches of specs to `TransformersSampler.sample`, which returns one `SampleResult`
or one `InvalidRequest` per spec, in order. A bad spec never affects the others: every spec is
validated before any compute, and its error is returned in its slot (`NotFound`, a subclass,
when its adapter is not loaded, e.g. evicted: load it and retry). Any other exception (a bug,
out of memory) fails the whole call.

    sampler = TransformersSampler("openrl/tiny-qwen3")
    sampler.load_adapter("sess:train:0@3", state, rank=16, alpha=32, target_modules=[...])
    [result] = sampler.sample([SampleSpec(prompt=ids, num_samples=4, max_tokens=64, adapter="sess:train:0@3")])
    result.sequences[0].tokens, result.sequences[0].logprobs, result.sequences[0].stop_reason

How a call runs:
- Requests are grouped into batches of at most `max_batch_rows` sampled sequences; requests
  on different adapters, and the base model, share a batch (peft's mixed-adapter forward,
  `adapter_names=`: one padded forward per decode step for all of them).
- Prefill: each request's prompt once, left-padded, with an attention mask and position ids
  that count real tokens only. The KV cache is then repeated to `num_samples` rows.
- Decode: one token per row per step, sampled on the device; a row leaves the batch (and the
  KV cache) as soon as it stops. One small device-to-host copy per step (which rows stopped,
  and their tokens when a stop string must be checked) decides that; the outputs move to
  the CPU once at the end.

Semantics (Tinker's, spec §5.6-5.7; choices marked *):
- Sampled-token `logprobs` are log_softmax(logits / temperature) of the token: the
  temperature-scaled distribution the token was drawn from, *before* top-k/top-p truncation.
  This is what Tinker's sampler returns (tinker-cookbook PR #86: "we're returning the same
  logprobs used for sampling, even when temperature scaling is applied"), so RL importance
  ratios against the trainer's logprobs are exact at temperature 1. At temperature 1 they
  equal the trainer's forward logprobs of the same tokens. *Truncation is not reflected
  (vLLM's default raw logprobs are untruncated too): these are what the trainer's forward
  can reproduce; a client that samples with top-k/top-p is off-policy by the truncation.
- *temperature 0 (and anything below 1e-5) is greedy (argmax); its logprobs are at
  temperature 1 (a point mass would say 0.0 and tell nothing).
- top_k (-1 off, ties with the k-th logit kept) then top_p (smallest most-likely set whose
  probability reaches p, renormalised after top-k), as HF's and vLLM's warpers.
- Stops: EOS ids (the tokenizer's eos and generation_config's `eos_token_id` list) unless
  `stop_at_eos` is False; `stop_token_ids`; `stop_strings`, which stop once the decoded
  generated text contains one. The stopping token is returned. stop_reason is "stop" for
  any of these, even on the last allowed token, else "length" at `max_tokens`.
- Seeds: row j of a request seeded s draws its uniforms from stream (s, 0, j), prompt alt
  tokens from (s, 1); uniforms are drawn on the CPU, so a seeded request gives the same tokens
  alone or in any batch (up to float noise in the logits). Unseeded requests get a fresh seed.
- Prompt statistics use the prefill's logits, at temperature 1 (`compute_logprobs` has no
  temperature): `prompt_logprobs` [L] (entry 0 NaN, NaN before the last N with
  `prompt_logprobs_last_n`), `topk_prompt_logprobs` [L, k] (row 0 and rows before the last N
  sentinel), `target_prompt_logprobs` [L-1, K] (0.0 at -1 cells).
  *`prompt_alt_tokens` [L-1, k] are drawn at the request temperature (no top-k/top-p) and
  their logprobs are under that same tempered distribution, like sampled tokens.
- *Top-k sampled logprobs (`topk_sample_logprobs`) are under the tempered distribution too.
- Caps: num_samples <= MAX_NUM_SAMPLES, every top-k / alt-token k <= MAX_TOPK, adapter rank
  <= MAX_RANK; prompt + max_tokens <= the model's max_position_embeddings.

Device: cuda (bf16), then mps, then cpu (fp32). Sampling math is fp32 on the device.
"""

from __future__ import annotations

import inspect
import math
import secrets
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from openrl.bus.errors import InvalidRequest, NotFound
from openrl.sampler.sampling import SENTINEL_LOGPROB, SENTINEL_TOKEN, draw, filter_top_k_top_p, top_logprobs, uniforms

log = structlog.get_logger(__name__)

MAX_NUM_SAMPLES = 128
MAX_TOPK = 64  # topk_prompt_logprobs, topk_sample_logprobs, prompt_alt_tokens_k
MAX_RANK = 256
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (as vLLM): logits / 1e-40 overflow
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class SampleSpec:
    """One asample request, decoded by the service (spec §3.3, §5.6)."""

    prompt: list[int]
    num_samples: int
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1  # -1 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)  # SamplingParams.stop as strings
    stop_token_ids: list[int] = field(default_factory=list)  # SamplingParams.stop as token ids
    stop_at_eos: bool = True  # False when the client sent stop=[] (run to max_tokens)
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: np.ndarray | None = None  # int [L-1, K] dense, -1 = nothing asked
    prompt_alt_tokens_k: int = 0
    adapter: str | None = None  # a key given to load_adapter; None = the base model


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


def pick_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class _Rows:
    """Per-row sampling parameters of a batch, as device tensors (B rows)."""

    temperature: torch.Tensor  # float32, 1.0 for greedy rows
    greedy: torch.Tensor  # bool
    top_k: torch.Tensor  # int64, vocab size when off
    top_p: torch.Tensor  # float32
    stop_ids: torch.Tensor  # int64 [B, S], -1 padding
    max_tokens: torch.Tensor  # int64
    u: torch.Tensor  # float32 [B, T] uniforms, one per step
    any_random: bool
    any_filter: bool

    def select(self, idx: torch.Tensor) -> _Rows:
        pick = {k: v[idx] if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return _Rows(**pick)


@dataclass
class _Outputs:
    """What decoding produces, per output row: device buffers [B, T(, K)] and CPU stop facts."""

    tokens_B_T: torch.Tensor
    logprobs_B_T: torch.Tensor
    top_tokens_B_T_K: torch.Tensor | None  # when some request asked for top-k sampled logprobs
    top_logprobs_B_T_K: torch.Tensor | None
    n_generated: np.ndarray  # int64 [B]
    stopped: np.ndarray  # bool [B]: by a stop token or string, else by max_tokens

    @classmethod
    def empty(cls, rows: int, horizon: int, k: int, dev: torch.device) -> _Outputs:
        def zeros(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=dev)

        return cls(
            tokens_B_T=zeros(rows, horizon, dtype=torch.int64),
            logprobs_B_T=zeros(rows, horizon, dtype=torch.float32),
            top_tokens_B_T_K=zeros(rows, horizon, k, dtype=torch.int64) if k else None,
            top_logprobs_B_T_K=zeros(rows, horizon, k, dtype=torch.float32) if k else None,
            n_generated=np.zeros(rows, dtype=np.int64),
            stopped=np.zeros(rows, dtype=bool),
        )

    def record(self, rows_b: torch.Tensor, t: int, token_b, logprob_b, logp_b_V) -> None:
        self.tokens_B_T[rows_b, t] = token_b
        self.logprobs_B_T[rows_b, t] = logprob_b
        if self.top_tokens_B_T_K is not None:
            k = self.top_tokens_B_T_K.shape[-1]
            self.top_tokens_B_T_K[rows_b, t], self.top_logprobs_B_T_K[rows_b, t] = top_logprobs(logp_b_V, k)


class TransformersSampler:
    def __init__(
        self,
        model_path: str,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_adapters: int = 16,
        max_batch_rows: int = 256,
    ):
        device = device or pick_device()
        dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.to(device).eval()
        model.requires_grad_(False)
        self.model = model
        self.peft = None  # a PeftModel around `model` once the first adapter is loaded
        self.device = torch.device(device)
        self.max_adapters = max_adapters
        self.max_batch_rows = max_batch_rows
        self._adapters: OrderedDict[str, str] = OrderedDict()  # key -> peft adapter name, LRU first
        self._next = 0
        # transformers 5 renamed the forward's `past_key_values` to `cache`.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # Shapes of every Linear, to check adapter states before touching the model.
        self._linears = {
            name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
        }
        self.tokenizer = _load_tokenizer(model_path)
        vocab = model.get_input_embeddings().num_embeddings
        self.info = SamplerInfo(
            vocab_size=vocab,
            max_context=model.config.max_position_embeddings,
            eos_token_ids=_eos_ids(model_path, model, self.tokenizer, vocab),
            has_tokenizer=self.tokenizer is not None,
            device=device,
            dtype=str(dtype).removeprefix("torch."),
        )
        log.info("sampler_loaded", path=model_path, device=device, dtype=self.info.dtype, eos=self.info.eos_token_ids)

    # ------------------------------------------------------------------ adapters

    def load_adapter(
        self, key: str, state: dict[str, torch.Tensor], *, rank: int, alpha: float, target_modules: list[str]
    ) -> None:
        """Load a LoRA adapter under `key`, replacing any adapter of that key.

        `state` is keyed as a saved peft adapter (what `LoraEngine.adapter_state` returns):
        `base_model.model.<module>.lora_A.weight` [rank, in], `...lora_B.weight` [out, rank] for
        every Linear whose last name component is in `target_modules`. The state is checked
        completely before the model is touched. Past `max_adapters`, the least recently used
        adapter is dropped; sampling it then fails with `NotFound` until it is loaded again.
        """
        from peft import LoraConfig, get_peft_model

        expected = self._adapter_shapes(rank, alpha, target_modules)
        _check_state(state, expected)
        name = f"a{self._next}"
        self._next += 1
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules))
        cuda_devices = list(range(torch.cuda.device_count()))
        # peft initialises new LoRA weights from the global RNG; leave the caller's streams alone.
        with torch.random.fork_rng(devices=cuda_devices), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tied lm_head and similar notices
            if self.peft is None:
                self.peft = get_peft_model(self.model, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
        self.peft.eval()
        params = {n.replace(f".{name}.", "."): p for n, p in self.peft.named_parameters() if f".{name}." in n}
        assert params.keys() == expected.keys(), "peft named the adapter's weights unlike a saved adapter"
        with torch.no_grad():
            for stable, p in params.items():
                p.copy_(state[stable])
        old = self._adapters.pop(key, None)
        self._adapters[key] = name
        if old is not None:
            self._delete(old)
        while len(self._adapters) > self.max_adapters:
            evicted, evicted_name = self._adapters.popitem(last=False)
            self._delete(evicted_name)
            log.info("adapter_evicted", key=evicted)
        log.info("adapter_loaded", key=key, adapter=name, rank=rank, modules=len(expected) // 2)

    def has_adapter(self, key: str) -> bool:
        return key in self._adapters

    def adapter_keys(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._adapters)

    def _delete(self, name: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "adapter was active which is now deleted"
            self.peft.delete_adapter(name)

    def _adapter_shapes(self, rank: int, alpha: float, target_modules: list[str]) -> dict[str, tuple[int, int]]:
        if not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
            raise InvalidRequest(f"lora rank must be in [1, {MAX_RANK}], got {rank}")
        if not math.isfinite(alpha) or alpha <= 0:
            raise InvalidRequest(f"lora alpha must be > 0, got {alpha}")
        known = {n.rsplit(".", 1)[-1] for n in self._linears}
        unknown = sorted(set(target_modules) - known)
        if not target_modules or unknown:
            raise InvalidRequest(f"target_modules must be a non-empty subset of {sorted(known)}, got {target_modules}")
        shapes = {}
        for module, (fan_in, fan_out) in self._linears.items():
            if module.rsplit(".", 1)[-1] in target_modules:
                shapes[f"base_model.model.{module}.lora_A.weight"] = (rank, fan_in)
                shapes[f"base_model.model.{module}.lora_B.weight"] = (fan_out, rank)
        return shapes

    # ------------------------------------------------------------------ validation

    def validate(self, spec: SampleSpec) -> None:
        """Raise InvalidRequest (NotFound for an unloaded adapter) naming the bad field. No compute."""
        vocab, n = self.info.vocab_size, len(spec.prompt)
        if n == 0:
            raise InvalidRequest("prompt is empty")
        _check_ids(spec.prompt, "prompt", vocab)
        if not _is_int(spec.num_samples) or not 1 <= spec.num_samples <= MAX_NUM_SAMPLES:
            raise InvalidRequest(f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {spec.num_samples}")
        if not _is_int(spec.max_tokens) or spec.max_tokens < 1:
            raise InvalidRequest(f"sampling_params.max_tokens must be >= 1, got {spec.max_tokens}")
        if n + spec.max_tokens > self.info.max_context:
            raise InvalidRequest(
                f"prompt ({n} tokens) + sampling_params.max_tokens ({spec.max_tokens}) exceeds "
                f"the model's context of {self.info.max_context} tokens"
            )
        if not math.isfinite(spec.temperature) or spec.temperature < 0:
            raise InvalidRequest(f"sampling_params.temperature must be >= 0, got {spec.temperature}")
        if not math.isfinite(spec.top_p) or not 0 < spec.top_p <= 1:
            raise InvalidRequest(f"sampling_params.top_p must be in (0, 1], got {spec.top_p}")
        if not _is_int(spec.top_k) or (spec.top_k != -1 and spec.top_k < 1):
            raise InvalidRequest(f"sampling_params.top_k must be -1 (off) or >= 1, got {spec.top_k}")
        if spec.seed is not None and not _is_int(spec.seed):
            raise InvalidRequest(f"sampling_params.seed must be an integer, got {spec.seed!r}")
        _check_ids(spec.stop_token_ids, "sampling_params.stop", vocab)
        if spec.stop_strings:
            if self.tokenizer is None:
                raise InvalidRequest("sampling_params.stop: stop strings need a tokenizer, and this model has none")
            if not all(isinstance(s, str) and s for s in spec.stop_strings):
                raise InvalidRequest("sampling_params.stop: stop strings must be non-empty strings")
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            k = getattr(spec, name)
            if not _is_int(k) or not 0 <= k <= MAX_TOPK:
                raise InvalidRequest(f"{name} must be in [0, {MAX_TOPK}], got {k}")
        last_n = spec.prompt_logprobs_last_n
        if last_n is not None:
            if not (spec.prompt_logprobs or spec.topk_prompt_logprobs):
                raise InvalidRequest("prompt_logprobs_last_n needs prompt_logprobs or topk_prompt_logprobs")
            if not _is_int(last_n) or not 1 <= last_n <= n - 1:
                raise InvalidRequest(
                    f"prompt_logprobs_last_n must be in [1, {n - 1}] (prompt length - 1), got {last_n}"
                )
        targets = spec.target_prompt_logprobs
        if targets is not None:
            targets = np.asarray(targets)
            if targets.ndim != 2 or targets.shape[0] != n - 1 or targets.dtype.kind not in "iu":
                raise InvalidRequest(
                    f"target_prompt_logprobs must be an integer [len(prompt) - 1, K] = [{n - 1}, K] tensor, "
                    f"got {targets.dtype} {list(targets.shape)}"
                )
            if targets.size and (targets.min() < -1 or targets.max() >= vocab):
                raise InvalidRequest(f"target_prompt_logprobs: ids must be -1 or in [0, {vocab})")
        if spec.adapter is not None and spec.adapter not in self._adapters:
            raise NotFound(f"adapter {spec.adapter!r} is not loaded on this sampler")

    # ------------------------------------------------------------------ sampling

    def sample(self, specs: list[SampleSpec]) -> list[SampleResult | InvalidRequest]:
        """One result per spec, in order: a SampleResult, or the InvalidRequest that spec raised."""
        out: list[SampleResult | InvalidRequest | None] = [None] * len(specs)
        group: list[int] = []
        rows = 0
        for i, spec in enumerate(specs):
            try:
                self.validate(spec)
            except InvalidRequest as e:
                out[i] = e
                continue
            if group and rows + spec.num_samples > self.max_batch_rows:
                self._run_group(specs, group, out)
                group, rows = [], 0
            group.append(i)
            rows += spec.num_samples
        if group:
            self._run_group(specs, group, out)
        return out

    def _run_group(self, specs: list[SampleSpec], group: list[int], out: list) -> None:
        for key in {specs[i].adapter for i in group} - {None}:
            self._adapters.move_to_end(key)
        with torch.inference_mode():
            results = self._generate([specs[i] for i in group])
        for i, result in zip(group, results, strict=True):
            out[i] = result

    def _generate(self, specs: list[SampleSpec]) -> list[SampleResult]:
        seeds = [s.seed if s.seed is not None else secrets.randbits(63) for s in specs]
        names = [BASE if s.adapter is None else self._adapters[s.adapter] for s in specs]
        results, last_R_V, cache, mask_R_L = self._prefill(specs, names, seeds)
        out = self._decode(specs, names, seeds, last_R_V, cache, mask_R_L)
        tokens_B_T, logprobs_B_T = out.tokens_B_T.cpu().numpy(), out.logprobs_B_T.cpu().numpy()
        if out.top_tokens_B_T_K is not None:
            top_tokens_B_T_K, top_logprobs_B_T_K = (
                out.top_tokens_B_T_K.cpu().numpy(),
                out.top_logprobs_B_T_K.cpu().numpy(),
            )
        owner_B = np.repeat(np.arange(len(specs)), [s.num_samples for s in specs])
        for b, r in enumerate(owner_B):
            n, k = out.n_generated[b], specs[r].topk_sample_logprobs
            results[r].sequences.append(
                SampledSequence(
                    tokens=tokens_B_T[b, :n].astype(np.int32),
                    logprobs=logprobs_B_T[b, :n].copy(),
                    stop_reason="stop" if out.stopped[b] else "length",
                    topk_tokens=top_tokens_B_T_K[b, :n, :k].copy() if k else None,
                    topk_logprobs=top_logprobs_B_T_K[b, :n, :k].copy() if k else None,
                )
            )
        return results

    def _prefill(self, specs: list[SampleSpec], names: list[str], seeds: list[int]):
        """Run every prompt once, left-padded (real tokens are the last len(prompt) columns).

        Returns results holding the prompt statistics, the last position's logits [R, V], the
        KV cache (R rows) and the attention mask [R, L].
        """
        dev = self.device
        lens = [len(s.prompt) for s in specs]
        width = max(lens)
        ids_R_L = np.zeros((len(specs), width), dtype=np.int64)
        mask_R_L = np.zeros((len(specs), width), dtype=np.int64)
        for r, s in enumerate(specs):
            ids_R_L[r, width - lens[r] :] = s.prompt
            mask_R_L[r, width - lens[r] :] = 1
        mask_R_L = torch.from_numpy(mask_R_L).to(dev)
        pos_R_L = (mask_R_L.cumsum(-1) - 1).clamp(min=0)  # pads share position 0; real tokens count from 0
        wants = [_wants_prompt_stats(s) for s in specs]
        # Prompt statistics need logits at every position: [R, L, V] for this batch.
        logits_R_X_V, cache = self._forward(
            torch.from_numpy(ids_R_L).to(dev), mask_R_L, pos_R_L, None, names, keep_all=any(wants)
        )
        results = [
            self._prompt_stats(s, logits_R_X_V[r, width - lens[r] :], seeds[r])
            if wants[r]
            else SampleResult(sequences=[])
            for r, s in enumerate(specs)
        ]
        return results, logits_R_X_V[:, -1], cache, mask_R_L

    def _decode(self, specs, names, seeds, last_R_V, cache, mask_R_L) -> _Outputs:
        """Sample every row to its stop, one batched forward per step; finished rows leave the batch."""
        dev = self.device
        owner_B = np.repeat(np.arange(len(specs)), [s.num_samples for s in specs])
        owner_dev = torch.from_numpy(owner_B).to(dev)
        if len(owner_B) != len(specs):
            cache.batch_select_indices(owner_dev)  # each prompt's cache, copied to its samples' rows
        horizon = max(s.max_tokens for s in specs)
        width = mask_R_L.shape[1]
        out = _Outputs.empty(len(owner_B), horizon, max(s.topk_sample_logprobs for s in specs), dev)
        step = self._rows(specs, seeds)  # the active rows' parameters
        mask_b_X = torch.cat(
            [mask_R_L[owner_dev], torch.ones((len(owner_B), horizon), dtype=torch.int64, device=dev)], 1
        )
        pos_b = torch.as_tensor([len(s.prompt) for s in specs], device=dev)[owner_dev]  # the next token's position
        row_names = [names[r] for r in owner_B]
        stops = _StopStrings(self.tokenizer, [specs[r].stop_strings for r in owner_B])
        # `active` maps the batch's (and the KV cache's) rows to output rows.
        active, active_dev = np.arange(len(owner_B)), torch.arange(len(owner_B), device=dev)
        logits_b_V = last_R_V[owner_dev]
        for t in range(horizon):
            token_b, logprob_b, logp_b_V = _pick(logits_b_V, step, step.u[:, t])
            out.record(active_dev, t, token_b, logprob_b, logp_b_V)
            hit_b = (step.stop_ids == token_b[:, None]).any(-1)
            full_b = step.max_tokens <= t + 1
            # The step's only device-to-host copy: which rows stopped (and tokens, for stop strings).
            flags = torch.stack([hit_b.long(), full_b.long(), token_b]).cpu().numpy()
            hit = flags[0].astype(bool) | stops.update(active, flags[2])
            ended = hit | flags[1].astype(bool)
            out.n_generated[active[ended]] = t + 1
            out.stopped[active[ended]] = hit[ended]
            if ended.all():
                break
            if ended.any():  # drop finished rows from the batch and the cache
                keep = np.flatnonzero(~ended)
                keep_dev = torch.from_numpy(keep).to(dev)
                active, active_dev, step = active[keep], active_dev[keep_dev], step.select(keep_dev)
                cache.batch_select_indices(keep_dev)
                mask_b_X, pos_b, token_b = mask_b_X[keep_dev], pos_b[keep_dev], token_b[keep_dev]
                row_names = [row_names[i] for i in keep]
            logits_b_1_V, cache = self._forward(
                token_b[:, None], mask_b_X[:, : width + t + 1], pos_b[:, None], cache, row_names, keep_all=False
            )
            logits_b_V = logits_b_1_V[:, -1]
            pos_b = pos_b + 1
        return out

    def _rows(self, specs: list[SampleSpec], seeds: list[int]) -> _Rows:
        """Per-row parameters for the samples of `specs`, in order (row j of a request is sample j)."""
        vocab, horizon = self.info.vocab_size, max(s.max_tokens for s in specs)
        rows = [(s, seed, j) for s, seed in zip(specs, seeds, strict=True) for j in range(s.num_samples)]
        row_specs = [s for s, _, _ in rows]
        greedy = [s.temperature < GREEDY_BELOW for s in row_specs]
        stop_sets = [sorted(_stop_ids(s, self.info.eos_token_ids)) for s in row_specs]
        stop_ids = np.full((len(rows), max(1, *map(len, stop_sets))), -1, dtype=np.int64)
        for b, ids in enumerate(stop_sets):
            stop_ids[b, : len(ids)] = ids
        u = torch.zeros((len(rows), horizon))
        for b, (s, seed, j) in enumerate(rows):
            u[b, : s.max_tokens] = uniforms(seed, 0, j, shape=(s.max_tokens,))
        dev = self.device
        return _Rows(
            temperature=torch.tensor([1.0 if s.temperature < GREEDY_BELOW else s.temperature for s in row_specs]).to(
                dev
            ),
            greedy=torch.tensor(greedy).to(dev),
            top_k=torch.tensor([vocab if s.top_k == -1 else s.top_k for s in row_specs]).to(dev),
            top_p=torch.tensor([s.top_p for s in row_specs], dtype=torch.float32).to(dev),
            stop_ids=torch.from_numpy(stop_ids).to(dev),
            max_tokens=torch.tensor([s.max_tokens for s in row_specs]).to(dev),
            u=u.to(dev),
            any_random=not all(greedy),
            any_filter=any(s.temperature >= GREEDY_BELOW and (s.top_k != -1 or s.top_p < 1) for s in row_specs),
        )

    def _forward(self, ids, mask, pos, cache, names: list[str], *, keep_all: bool):
        """Logits [B, X, V] (X = all positions if keep_all, else 1) and the updated KV cache."""
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        kwargs[self._cache_kw] = cache
        kwargs["logits_to_keep"] = 0 if keep_all else 1
        if self.peft is None:
            out = self.model(**kwargs)
        else:
            out = self.peft(**kwargs, adapter_names=names)
        return out.logits, getattr(out, self._cache_kw)

    def _prompt_stats(self, spec: SampleSpec, logits_L_V: torch.Tensor, seed: int) -> SampleResult:
        """Prompt logprobs, top-k, targets and alternative draws from the prefill's logits [L, V]."""
        dev, n = self.device, len(spec.prompt)
        result = SampleResult(sequences=[])
        logits_M_V = logits_L_V[:-1].float()  # row i predicts prompt[i + 1]
        logp_M_V = logits_M_V.log_softmax(-1)
        first_scored = n - spec.prompt_logprobs_last_n if spec.prompt_logprobs_last_n else 1
        if spec.prompt_logprobs:
            nxt_M = torch.as_tensor(spec.prompt[1:], device=dev)
            lp_L = torch.full((n,), float("nan"), device=dev)
            lp_L[1:] = logp_M_V.gather(-1, nxt_M[:, None])[:, 0]
            lp_L[:first_scored] = float("nan")
            result.prompt_logprobs = lp_L.cpu().numpy()
        if k := spec.topk_prompt_logprobs:
            tokens_L_K = torch.full((n, k), SENTINEL_TOKEN, dtype=torch.int64, device=dev)
            lps_L_K = torch.full((n, k), SENTINEL_LOGPROB, device=dev)
            tokens_L_K[1:], lps_L_K[1:] = top_logprobs(logp_M_V, k)
            tokens_L_K[:first_scored], lps_L_K[:first_scored] = SENTINEL_TOKEN, SENTINEL_LOGPROB
            result.topk_prompt_tokens, result.topk_prompt_logprobs = tokens_L_K.cpu().numpy(), lps_L_K.cpu().numpy()
        if spec.target_prompt_logprobs is not None:
            ids_M_K = torch.as_tensor(np.asarray(spec.target_prompt_logprobs, dtype=np.int64), device=dev)
            lp_M_K = logp_M_V.gather(-1, ids_M_K.clamp(min=0)).masked_fill(ids_M_K < 0, 0.0)
            result.target_prompt_logprobs = lp_M_K.cpu().numpy()
        if k := spec.prompt_alt_tokens_k:
            if spec.temperature < GREEDY_BELOW:
                alt_M_K = logp_M_V.argmax(-1, keepdim=True).expand(-1, k).contiguous()
                tempered_M_V = logp_M_V
            else:
                tempered_M_V = (logits_M_V / spec.temperature).log_softmax(-1)
                alt_M_K = draw(tempered_M_V.exp(), uniforms(seed, 1, shape=(n - 1, k)).to(dev))
            result.prompt_alt_tokens = alt_M_K.cpu().numpy()
            result.prompt_alt_logprobs = tempered_M_V.gather(-1, alt_M_K).cpu().numpy()
        return result


# ---------------------------------------------------------------------- per-step math


def _pick(logits_B_V: torch.Tensor, rows: _Rows, u_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The next token of every row, its logprob, and the tempered logprobs [B, V] it came from."""
    logits_B_V = logits_B_V.float()
    scaled_B_V = logits_B_V / rows.temperature[:, None]
    logp_B_V = scaled_B_V.log_softmax(-1)
    token_B = logits_B_V.argmax(-1)
    if rows.any_random:
        if rows.any_filter:
            probs_B_V = filter_top_k_top_p(scaled_B_V, rows.top_k, rows.top_p).softmax(-1)
        else:
            probs_B_V = logp_B_V.exp()
        token_B = torch.where(rows.greedy, token_B, draw(probs_B_V, u_B[:, None])[:, 0])
    return token_B, logp_B_V.gather(-1, token_B[:, None])[:, 0], logp_B_V


class _StopStrings:
    """Stop-string matching on the decoded generated text, for the rows that have stop strings."""

    def __init__(self, tokenizer, strings_B: list[list[str]]):
        self.tokenizer = tokenizer
        self.strings = {b: s for b, s in enumerate(strings_B) if s}
        self.tokens: dict[int, list[int]] = {b: [] for b in self.strings}
        # A match ends in the newest token; decoding a window of the last few tokens (generous for
        # tokens that are byte fragments of one character) is enough to see it.
        self.window = {b: 4 * max(map(len, s)) + 8 for b, s in self.strings.items()}

    def update(self, active: np.ndarray, tokens_b: np.ndarray) -> np.ndarray:
        """Record each active row's new token; True where a row's text now contains a stop string."""
        hit = np.zeros(len(active), dtype=bool)
        if not self.strings:
            return hit
        for i, b in enumerate(active):
            if b not in self.strings:
                continue
            toks = self.tokens[b]
            toks.append(int(tokens_b[i]))
            tail = self.tokenizer.decode(toks[-self.window[b] :], skip_special_tokens=False)
            hit[i] = any(s in tail for s in self.strings[b])
        return hit


# ---------------------------------------------------------------------- helpers


def _wants_prompt_stats(spec: SampleSpec) -> bool:
    return bool(
        spec.prompt_logprobs
        or spec.topk_prompt_logprobs
        or spec.prompt_alt_tokens_k
        or spec.target_prompt_logprobs is not None
    )


def _stop_ids(spec: SampleSpec, eos: tuple[int, ...]) -> set[int]:
    return set(spec.stop_token_ids) | (set(eos) if spec.stop_at_eos else set())


def _eos_ids(model_path: str, model, tokenizer, vocab: int) -> tuple[int, ...]:
    """The tokenizer's eos plus generation_config's eos_token_id (an int or a list)."""
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


def _load_tokenizer(model_path: str):
    """The checkpoint's tokenizer, or None for a bare checkpoint (no tokenizer files)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError):
        return None
    # transformers 5 builds an empty tokenizer from the model type when files are missing.
    return tokenizer if len(tokenizer) > 1 else None


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_ids(ids, where: str, vocab: int) -> None:
    arr = np.asarray(ids)
    if arr.size == 0:
        return
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidRequest(f"{where}: token ids must be a list of integers")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
        raise InvalidRequest(f"{where}: token ids must be in [0, {vocab}), got {lo if lo < 0 else hi}")


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, int]]) -> None:
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    if missing or extra:
        raise InvalidRequest(f"adapter state does not match its config: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, shape in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise InvalidRequest(f"adapter state {key}: shape {list(t.shape)}, expected {list(shape)}")
        if not torch.isfinite(t).all():
            raise InvalidRequest(f"adapter state {key}: values must be finite")

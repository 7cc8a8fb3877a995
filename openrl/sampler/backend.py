"""Sampling compute: batched generation with a KV cache over one base model and its LoRA adapters.

Pure compute: no networking, no asyncio, called from a single thread. The sampler service
decodes an `asample` request into a `SampleSpec`, loads the adapter it names (`load_adapter`),
and adds its spec to a running `Scheduler`; `TransformersSampler.sample` takes a list of specs
and returns one `SampleResult` or one `InvalidRequest` per spec, in order. A bad spec never
affects the others: every spec is validated before any compute, and its error is returned in
its slot (`NotFound`, a subclass, when its adapter is not loaded, e.g. evicted: load it and
retry). Any other exception (a bug, out of memory) fails the whole call (`Scheduler.abort`).

    sampler = TransformersSampler("openrl/tiny-qwen3")
    sampler.load_adapter("sess:train:0@3", state, rank=16, alpha=32, target_modules=[...])
    [result] = sampler.sample([SampleSpec(prompt=ids, num_samples=4, max_tokens=64, adapter="sess:train:0@3")])
    result.sequences[0].tokens, result.sequences[0].logprobs, result.sequences[0].stop_reason

How a call runs (`Scheduler`: continuous batching; `sample` is a loop over it):
- Requests join a running decode between steps, and leave it as soon as all their rows
  stop. At most `max_batch_rows` sampled sequences are active; requests that do not fit
  wait, in order, for rows to free up. Requests on different adapters, and the base model,
  share every forward (peft's mixed-adapter forward, `adapter_names=`).
- Prefill: the requests admitted at a step, each prompt once, left-padded, with an attention
  mask and position ids that count real tokens only. Their KV cache is repeated to
  `num_samples` rows and merged into the running cache (the shorter one left-padded, masked).
- Decode: one token per row per step, sampled on the device; a row leaves the batch (and the
  KV cache) as soon as it stops. One small device-to-host copy per step (which rows stopped,
  and their tokens when a stop string must be checked) decides that; a finished row's
  outputs move to the CPU when it stops.
- Adapters a running or waiting request uses are pinned: LRU eviction (and replacement
  under the same key) never removes them from under it.

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
from collections import Counter, OrderedDict, deque
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


def _cap_memory(dev: torch.device, fraction: float) -> None:
    """At most `fraction` of the GPU's memory for this process (torch's caching allocator then
    raises OOM rather than take more), so a sampler sharing a GPU with a trainer leaves it the
    rest. Before the model loads: the cap covers the weights too."""
    if dev.type != "cuda":
        raise ValueError(f"a GPU memory fraction needs a CUDA device, not {dev}")
    if not 0 < fraction <= 1:
        raise ValueError(f"a GPU memory fraction must be in (0, 1], got {fraction}")
    torch.cuda.set_per_process_memory_fraction(float(fraction), dev.index if dev.index is not None else torch.cuda.current_device())


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

    @staticmethod
    def cat(a: _Rows, b: _Rows) -> _Rows:
        """The rows of `a` then those of `b` (stop ids padded with -1, uniforms with zeros)."""
        stops, horizon = max(a.stop_ids.shape[1], b.stop_ids.shape[1]), max(a.u.shape[1], b.u.shape[1])
        return _Rows(
            temperature=torch.cat([a.temperature, b.temperature]),
            greedy=torch.cat([a.greedy, b.greedy]),
            top_k=torch.cat([a.top_k, b.top_k]),
            top_p=torch.cat([a.top_p, b.top_p]),
            stop_ids=torch.cat([_pad_right(a.stop_ids, 1, stops, -1), _pad_right(b.stop_ids, 1, stops, -1)]),
            max_tokens=torch.cat([a.max_tokens, b.max_tokens]),
            u=torch.cat([_pad_right(a.u, 1, horizon, 0.0), _pad_right(b.u, 1, horizon, 0.0)]),
            any_random=a.any_random or b.any_random,
            any_filter=a.any_filter or b.any_filter,
        )


@dataclass
class _Outputs:
    """What the active rows generated so far: device buffers [b, T(, K)], row i = active row i.

    Token t of a row is written at column t; rows of different ages write different columns."""

    tokens_b_T: torch.Tensor
    logprobs_b_T: torch.Tensor
    top_tokens_b_T_K: torch.Tensor | None  # when some active row asked for top-k sampled logprobs
    top_logprobs_b_T_K: torch.Tensor | None

    @classmethod
    def empty(cls, rows: int, horizon: int, k: int, dev: torch.device) -> _Outputs:
        def zeros(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=dev)

        return cls(
            tokens_b_T=zeros(rows, horizon, dtype=torch.int64),
            logprobs_b_T=zeros(rows, horizon, dtype=torch.float32),
            top_tokens_b_T_K=zeros(rows, horizon, k, dtype=torch.int64) if k else None,
            top_logprobs_b_T_K=zeros(rows, horizon, k, dtype=torch.float32) if k else None,
        )

    def record(self, t_b: torch.Tensor, token_b, logprob_b, logp_b_V) -> None:
        rows_b = torch.arange(len(t_b), device=t_b.device)
        self.tokens_b_T[rows_b, t_b] = token_b
        self.logprobs_b_T[rows_b, t_b] = logprob_b
        if self.top_tokens_b_T_K is not None:
            k = self.top_tokens_b_T_K.shape[-1]
            self.top_tokens_b_T_K[rows_b, t_b], self.top_logprobs_b_T_K[rows_b, t_b] = top_logprobs(logp_b_V, k)

    def select(self, idx: torch.Tensor) -> _Outputs:
        return _Outputs(*(None if v is None else v[idx] for v in self._fields()))

    def _fields(self) -> tuple:
        return (self.tokens_b_T, self.logprobs_b_T, self.top_tokens_b_T_K, self.top_logprobs_b_T_K)

    @staticmethod
    def cat(a: _Outputs, b: _Outputs) -> _Outputs:
        horizon = max(a.tokens_b_T.shape[1], b.tokens_b_T.shape[1])
        k = max(0 if x.top_tokens_b_T_K is None else x.top_tokens_b_T_K.shape[2] for x in (a, b))
        dev = a.tokens_b_T.device

        def grown(x: _Outputs) -> list:
            rows = x.tokens_b_T.shape[0]
            fields = [_pad_right(x.tokens_b_T, 1, horizon, 0), _pad_right(x.logprobs_b_T, 1, horizon, 0.0)]
            if k:
                if x.top_tokens_b_T_K is None:
                    fields += [
                        torch.zeros((rows, horizon, k), dtype=torch.int64, device=dev),
                        torch.zeros((rows, horizon, k), dtype=torch.float32, device=dev),
                    ]
                else:
                    fields += [
                        _pad_right(_pad_right(x.top_tokens_b_T_K, 1, horizon, 0), 2, k, 0),
                        _pad_right(_pad_right(x.top_logprobs_b_T_K, 1, horizon, 0.0), 2, k, 0.0),
                    ]
            else:
                fields += [None, None]
            return fields

        return _Outputs(*(None if x is None else torch.cat([x, y]) for x, y in zip(grown(a), grown(b), strict=True)))


class TransformersSampler:
    def __init__(
        self,
        model_path: str,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_adapters: int = 16,
        max_batch_rows: int = 256,
        memory_fraction: float | None = None,
    ):
        device = device or pick_device()
        if memory_fraction is not None:
            _cap_memory(torch.device(device), memory_fraction)
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
        # Peft adapter names that running requests use (how many): never deleted under them. A
        # replaced adapter still in use is deleted when its last request finishes (`_doomed`).
        self._pins: Counter[str] = Counter()
        self._doomed: set[str] = set()
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
        log.info("sampler_loaded", path=model_path, device=device, dtype=self.info.dtype, eos=self.info.eos_token_ids,
                 memory_fraction=memory_fraction)

    # ------------------------------------------------------------------ adapters

    def load_adapter(
        self, key: str, state: dict[str, torch.Tensor], *, rank: int, alpha: float, target_modules: list[str]
    ) -> None:
        """Load a LoRA adapter under `key`, replacing any adapter of that key.

        `state` is keyed as a saved peft adapter (what `LoraEngine.adapter_state` returns):
        `base_model.model.<module>.lora_A.weight` [rank, in], `...lora_B.weight` [out, rank] for
        every Linear whose last name component is in `target_modules`. The state is checked
        completely before the model is touched. Past `max_adapters`, the least recently used
        adapter that no added request uses is dropped; sampling it then fails with `NotFound` until
        it is loaded again. Replacing an adapter in use keeps the old weights for the requests
        already added (deleted when the last of them finishes).
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
            if old in self._pins:
                self._doomed.add(old)
            else:
                self._delete(old)
        self._evict(keep=key)
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

    def _evict(self, keep: str | None = None) -> None:
        """Past `max_adapters`, drop the least recently used adapters that no running request uses,
        never `keep` (just loaded); when all others are in use, the cap is exceeded until some finish."""
        while len(self._adapters) > self.max_adapters:
            victim = next((k for k, n in self._adapters.items() if n not in self._pins and k != keep), None)
            if victim is None:
                return
            self._delete(self._adapters.pop(victim))
            log.info("adapter_evicted", key=victim)

    def _pin(self, name: str) -> None:
        if name != BASE:
            self._pins[name] += 1

    def _unpin(self, name: str) -> None:
        if name == BASE:
            return
        self._pins[name] -= 1
        if self._pins[name] > 0:
            return
        del self._pins[name]
        if name in self._doomed:
            self._doomed.discard(name)
            self._delete(name)
        self._evict()

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
        check_spec(spec, self.info)
        if spec.adapter is not None and spec.adapter not in self._adapters:
            raise NotFound(f"adapter {spec.adapter!r} is not loaded on this sampler")

    # ------------------------------------------------------------------ sampling

    def sample(self, specs: list[SampleSpec]) -> list[SampleResult | InvalidRequest]:
        """One result per spec, in order: a SampleResult, or the InvalidRequest that spec raised.

        A thin loop over a `Scheduler`: every spec is added, then steps run until all have finished
        (at most `max_batch_rows` rows at a time; waiting requests join as rows free up).
        """
        scheduler = Scheduler(self)
        out: list[SampleResult | InvalidRequest | None] = [None] * len(specs)
        try:
            for i, spec in enumerate(specs):
                scheduler.add(i, spec)
            while not scheduler.idle:
                for i, result in scheduler.step():
                    out[i] = result
        except BaseException:
            scheduler.abort()  # release the adapters its requests pinned
            raise
        return out

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


# ---------------------------------------------------------------------- continuous batching


@dataclass
class _Request:
    spec_id: object
    spec: SampleSpec
    seed: int
    name: str  # peft adapter name, BASE for the base model
    result: SampleResult | None = None  # prompt statistics, once prefilled; sequences when finished
    sequences: list[SampledSequence | None] = field(default_factory=list)
    left: int = 0  # rows still generating


class Scheduler:
    """Continuous batching over one `TransformersSampler`: requests join a running decode
    between steps, and leave it as soon as their rows have stopped. One thread only.

        scheduler = Scheduler(sampler)
        scheduler.add("a", spec_a)               # validated now; prefilled by the next step
        finished = scheduler.step()              # [(spec_id, SampleResult | InvalidRequest)]
        scheduler.add("b", spec_b)               # joins the running decode at the next step

    `add` validates a request (an invalid one comes back from the next `step` as its
    InvalidRequest, touching nothing) and queues it. `step` first admits queued requests in
    order while the active rows stay within `max_batch_rows` (always at least one when none
    are active): one left-padded prefill forward for all of them (prompt statistics come
    from it), their KV cache repeated to `num_samples` rows and merged into the running
    one. Then it draws one token for every active row and runs one forward (base and
    adapters mixed) for the rows that go on; it returns the requests whose last row stopped.

    The running cache has one common length W; each row's real tokens are its last columns
    (left padding masked out by the attention mask, positions counted per row), so rows of
    different prompt lengths and ages share every forward. Merging left-pads whichever of
    the two caches is shorter; when rows leave, the leading columns no active row needs are
    cut. A row's tokens depend only on its own prompt, adapter and seed (uniforms drawn per
    row and step index), never on the rows around it, up to float noise in the logits.
    """

    def __init__(self, sampler: TransformersSampler):
        self.sampler = sampler
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}  # by admission number
        self._admitting: list[_Request] = []  # being prefilled and merged (for `abort` if that fails)
        self._done: list[tuple[object, SampleResult | InvalidRequest]] = []
        self._admitted = 0
        self._row_ids = 0  # a fresh id per row, for stop strings
        self._clear_rows()

    def _clear_rows(self) -> None:
        """Active-row state, row i of every field = active row i."""
        self._cache = None  # KV cache [b, heads, W, dim] per layer
        self._mask_b_W: torch.Tensor | None = None  # int64: 1 on the columns a row attends to
        self._logits_b_V: torch.Tensor | None = None  # the next token's logits
        self._pos_b: torch.Tensor | None = None  # the next token's position
        self._t_b: torch.Tensor | None = None  # tokens drawn so far (device copy of `_t`)
        self._params: _Rows | None = None
        self._out: _Outputs | None = None
        self._names: list[str] = []
        self._req = np.zeros(0, dtype=np.int64)  # admission number of the row's request
        self._sample = np.zeros(0, dtype=np.int64)  # the row's sample index in its request
        self._t = np.zeros(0, dtype=np.int64)
        self._plen = np.zeros(0, dtype=np.int64)  # prompt length
        self._ids = np.zeros(0, dtype=np.int64)
        self._stops = _StopStrings(self.sampler.tokenizer)

    @property
    def rows(self) -> int:
        """Active rows (sequences being generated)."""
        return len(self._req)

    @property
    def requests(self) -> int:
        """Requests added and not yet returned by `step`."""
        return len(self._waiting) + len(self._running) + len(self._done)

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._running or self._done)

    def add(self, spec_id: object, spec: SampleSpec) -> None:
        """Validate `spec` and queue it; the next `step` admits it (or returns its error)."""
        sampler = self.sampler
        try:
            sampler.validate(spec)
        except InvalidRequest as e:
            self._done.append((spec_id, e))
            return
        name = BASE
        if spec.adapter is not None:
            sampler._adapters.move_to_end(spec.adapter)
            name = sampler._adapters[spec.adapter]
        sampler._pin(name)  # the adapter stays loaded until this request finishes
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        self._waiting.append(_Request(spec_id=spec_id, spec=spec, seed=seed, name=name))

    def step(self) -> list[tuple[object, SampleResult | InvalidRequest]]:
        """Admit what fits, advance every active row one token; the requests that finished."""
        with torch.inference_mode():
            self._admit()
            if self.rows:
                self._decode_step()
        done, self._done = self._done, []
        return done

    def abort(self) -> list[object]:
        """Drop every waiting and running request (after `step` raised: its state may be half
        updated) and return their spec_ids. Results already finished still come from `step`."""
        dropped = list({id(r): r for r in (*self._waiting, *self._admitting, *self._running.values())}.values())
        for request in dropped:
            self.sampler._unpin(request.name)
        self._waiting.clear()
        self._admitting = []
        self._running.clear()
        self._clear_rows()
        return [r.spec_id for r in dropped]

    # -- admission

    def _admit(self) -> None:
        cap, rows = self.sampler.max_batch_rows, self.rows
        group: list[_Request] = []
        while self._waiting and (rows + self._waiting[0].spec.num_samples <= cap or (rows == 0 and not group)):
            group.append(self._waiting.popleft())
            rows += group[-1].spec.num_samples
        if not group:
            return
        self._admitting = group
        self._merge(group)
        self._admitting = []

    def _merge(self, group: list[_Request]) -> None:
        """Prefill `group` and merge its rows into the running batch."""
        sampler, dev = self.sampler, self.sampler.device
        specs = [r.spec for r in group]
        results, last_R_V, cache, mask_R_L = sampler._prefill(specs, [r.name for r in group], [r.seed for r in group])
        counts = [s.num_samples for s in specs]
        owner = np.repeat(np.arange(len(group)), counts)
        owner_dev = torch.from_numpy(owner).to(dev)
        if len(owner) != len(group):
            cache.batch_select_indices(owner_dev)  # each prompt's cache, copied to its samples' rows
        numbers = []
        for request, result in zip(group, results, strict=True):
            request.result, request.sequences, request.left = result, [None] * request.spec.num_samples, request.spec.num_samples
            self._running[self._admitted] = request
            numbers.append(self._admitted)
            self._admitted += 1
        lens = np.array([len(s.prompt) for s in specs], dtype=np.int64)
        ids = np.arange(self._row_ids, self._row_ids + len(owner))
        self._row_ids += len(owner)
        self._stops.add(ids, [specs[r].stop_strings for r in owner])
        new = dict(
            mask=mask_R_L[owner_dev],
            logits=last_R_V[owner_dev],
            pos=torch.from_numpy(lens).to(dev)[owner_dev],
            t=torch.zeros(len(owner), dtype=torch.int64, device=dev),
            params=sampler._rows(specs, [r.seed for r in group]),
            out=_Outputs.empty(len(owner), max(s.max_tokens for s in specs), max(s.topk_sample_logprobs for s in specs), dev),
        )
        host = dict(
            req=np.array(numbers, dtype=np.int64)[owner],
            sample=np.concatenate([np.arange(n) for n in counts]),
            t=np.zeros(len(owner), dtype=np.int64),
            plen=lens[owner],
            ids=ids,
        )
        names = [group[r].name for r in owner]
        if self.rows == 0:
            self._cache = cache
            self._mask_b_W, self._logits_b_V, self._pos_b = new["mask"], new["logits"], new["pos"]
            self._t_b, self._params, self._out = new["t"], new["params"], new["out"]
            self._names = names
            self._req, self._sample, self._t, self._plen, self._ids = (host[k] for k in ("req", "sample", "t", "plen", "ids"))
            return
        width = max(self._mask_b_W.shape[1], new["mask"].shape[1])
        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            _check_layer(old_layer)
            old_layer.keys = torch.cat([_pad_left(old_layer.keys, 2, width), _pad_left(new_layer.keys, 2, width)])
            old_layer.values = torch.cat([_pad_left(old_layer.values, 2, width), _pad_left(new_layer.values, 2, width)])
        self._mask_b_W = torch.cat([_pad_left(self._mask_b_W, 1, width), _pad_left(new["mask"], 1, width)])
        self._logits_b_V = torch.cat([self._logits_b_V, new["logits"].to(self._logits_b_V.dtype)])
        self._pos_b = torch.cat([self._pos_b, new["pos"]])
        self._t_b = torch.cat([self._t_b, new["t"]])
        self._params = _Rows.cat(self._params, new["params"])
        self._out = _Outputs.cat(self._out, new["out"])
        self._names = self._names + names
        self._req = np.concatenate([self._req, host["req"]])
        self._sample = np.concatenate([self._sample, host["sample"]])
        self._t = np.concatenate([self._t, host["t"]])
        self._plen = np.concatenate([self._plen, host["plen"]])
        self._ids = np.concatenate([self._ids, host["ids"]])

    # -- decoding

    def _decode_step(self) -> None:
        dev, params = self.sampler.device, self._params
        u_b = params.u.gather(1, self._t_b[:, None])[:, 0]  # each row's uniform for its own step index
        token_b, logprob_b, logp_b_V = _pick(self._logits_b_V, params, u_b)
        self._out.record(self._t_b, token_b, logprob_b, logp_b_V)
        hit_b = (params.stop_ids == token_b[:, None]).any(-1)
        full_b = params.max_tokens <= self._t_b + 1
        # The step's only device-to-host copy: which rows stopped (and tokens, for stop strings).
        flags = torch.stack([hit_b.long(), full_b.long(), token_b]).cpu().numpy()
        hit = flags[0].astype(bool) | self._stops.update(self._ids, flags[2])
        ended = hit | flags[1].astype(bool)
        self._t += 1
        self._t_b = self._t_b + 1
        if ended.any():
            self._finish(np.flatnonzero(ended), hit)
            if ended.all():
                self._clear_rows()
                return
            keep = np.flatnonzero(~ended)
            keep_dev = torch.from_numpy(keep).to(dev)
            self._select(keep, keep_dev)
            token_b = token_b[keep_dev]
            self._trim()
        mask_b_X = torch.cat([self._mask_b_W, torch.ones((self.rows, 1), dtype=self._mask_b_W.dtype, device=dev)], 1)
        logits_b_1_V, self._cache = self.sampler._forward(
            token_b[:, None], mask_b_X, self._pos_b[:, None], self._cache, self._names, keep_all=False
        )
        self._logits_b_V, self._mask_b_W, self._pos_b = logits_b_1_V[:, -1], mask_b_X, self._pos_b + 1

    def _finish(self, rows: np.ndarray, hit: np.ndarray) -> None:
        """Move the stopped rows' outputs to the CPU (one copy per buffer) into their requests."""
        rows_dev = torch.from_numpy(rows).to(self.sampler.device)
        out = self._out.select(rows_dev)
        tokens, logprobs = out.tokens_b_T.cpu().numpy(), out.logprobs_b_T.cpu().numpy()
        if out.top_tokens_b_T_K is not None:
            top_tokens, top_logprobs_ = out.top_tokens_b_T_K.cpu().numpy(), out.top_logprobs_b_T_K.cpu().numpy()
        for i, b in enumerate(rows):
            request = self._running[self._req[b]]
            n, k = self._t[b], request.spec.topk_sample_logprobs
            request.sequences[self._sample[b]] = SampledSequence(
                tokens=tokens[i, :n].astype(np.int32),
                logprobs=logprobs[i, :n].copy(),
                stop_reason="stop" if hit[b] else "length",
                topk_tokens=top_tokens[i, :n, :k].copy() if k else None,
                topk_logprobs=top_logprobs_[i, :n, :k].copy() if k else None,
            )
            request.left -= 1
            if request.left == 0:
                del self._running[self._req[b]]
                request.result.sequences = request.sequences
                self._done.append((request.spec_id, request.result))
                self.sampler._unpin(request.name)
        self._stops.drop(self._ids[rows])

    def _select(self, keep: np.ndarray, keep_dev: torch.Tensor) -> None:
        self._cache.batch_select_indices(keep_dev)
        self._mask_b_W, self._pos_b, self._t_b = self._mask_b_W[keep_dev], self._pos_b[keep_dev], self._t_b[keep_dev]
        self._logits_b_V = None  # the next forward replaces them
        self._params, self._out = self._params.select(keep_dev), self._out.select(keep_dev)
        self._names = [self._names[i] for i in keep]
        self._req, self._sample, self._t, self._plen, self._ids = (
            a[keep] for a in (self._req, self._sample, self._t, self._plen, self._ids)
        )

    def _trim(self) -> None:
        """Cut the leading cache columns that no active row attends to (rows hold prompt + t - 1
        tokens here: the newest token is not in the cache yet)."""
        cut = self._mask_b_W.shape[1] - int((self._plen + self._t - 1).max())
        if cut <= 0:
            return
        for layer in self._cache.layers:
            _check_layer(layer)
            layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
        self._mask_b_W = self._mask_b_W[:, cut:]


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
    """Stop-string matching on the decoded generated text, for the rows (by row id) that have stop strings."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.strings: dict[int, list[str]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.window: dict[int, int] = {}

    def add(self, ids, strings_b: list[list[str]]) -> None:
        for b, strings in zip(ids, strings_b, strict=True):
            if strings:
                self.strings[int(b)], self.tokens[int(b)] = strings, []
                # A match ends in the newest token; decoding a window of the last few tokens (generous
                # for tokens that are byte fragments of one character) is enough to see it.
                self.window[int(b)] = 4 * max(map(len, strings)) + 8

    def drop(self, ids) -> None:
        for b in ids:
            for d in (self.strings, self.tokens, self.window):
                d.pop(int(b), None)

    def update(self, ids: np.ndarray, tokens_b: np.ndarray) -> np.ndarray:
        """Record each row's new token; True where a row's text now contains a stop string."""
        hit = np.zeros(len(ids), dtype=bool)
        if not self.strings:
            return hit
        for i, b in enumerate(ids):
            b = int(b)
            if b not in self.strings:
                continue
            toks = self.tokens[b]
            toks.append(int(tokens_b[i]))
            tail = self.tokenizer.decode(toks[-self.window[b] :], skip_special_tokens=False)
            hit[i] = any(s in tail for s in self.strings[b])
        return hit


# ---------------------------------------------------------------------- helpers


def check_spec(spec: SampleSpec, info: SamplerInfo) -> None:
    """Raise InvalidRequest naming the bad field of `spec` for a model described by `info`. No compute.

    Every backend checks this; a backend adds its own limits (and adapter lookup) on top."""
    vocab, n = info.vocab_size, len(spec.prompt)
    if n == 0:
        raise InvalidRequest("prompt is empty")
    _check_ids(spec.prompt, "prompt", vocab)
    if not _is_int(spec.num_samples) or not 1 <= spec.num_samples <= MAX_NUM_SAMPLES:
        raise InvalidRequest(f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {spec.num_samples}")
    if not _is_int(spec.max_tokens) or spec.max_tokens < 1:
        raise InvalidRequest(f"sampling_params.max_tokens must be >= 1, got {spec.max_tokens}")
    if n + spec.max_tokens > info.max_context:
        raise InvalidRequest(
            f"prompt ({n} tokens) + sampling_params.max_tokens ({spec.max_tokens}) exceeds "
            f"the model's context of {info.max_context} tokens"
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
        if not info.has_tokenizer:
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


def _pad_left(x: torch.Tensor, dim: int, size: int, value=0) -> torch.Tensor:
    """`x` grown to `size` along `dim` with `value` cells in front."""
    n = size - x.shape[dim]
    if n <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_full(shape, value), x], dim)


def _pad_right(x: torch.Tensor, dim: int, size: int, value=0) -> torch.Tensor:
    """`x` grown to `size` along `dim` with `value` cells after it."""
    n = size - x.shape[dim]
    if n <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x, x.new_full(shape, value)], dim)


def _check_layer(layer) -> None:
    """Merging and cutting caches edit the layers' key/value tensors: plain full-attention layers only."""
    if type(layer).__name__ != "DynamicLayer" or not getattr(layer, "is_initialized", True):
        raise NotImplementedError(f"continuous batching needs plain DynamicLayer caches, got {type(layer).__name__}")

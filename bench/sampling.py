"""Sampling through the stack, measured against bare generation in the same run.

1. Sampling throughput ratio: generated tokens per second through the whole path
   (tinker SDK -> gateway -> JetStream work queue -> sampler -> KV future -> gateway -> SDK),
   many `sample` futures in flight at once, divided by the same generation done bare: the
   sampler's own backend (`TransformersSampler`) called in this process with the same
   prompts, seeds and max_tokens as one list of `SampleSpec`s. `stop=[]` on both sides, so
   every sequence runs to max_tokens and both sides generate the same number of tokens.
   Stack and bare repetitions are interleaved, with the same torch thread count on both sides
   (`openrl up --threads N --samplers 1`). Two ratios: of the two medians, and the median of
   the per-pair ratios (each stack repetition against the bare one right after it) with its
   quartiles, which is the steadier one on a VM whose speed drifts between repetitions.
2. Two samplers vs one: the same stack-side workload on a second stack started with
   `--samplers 2` (competing consumers of the same queue), tokens/s and the 2-vs-1 ratio.
   Both samplers share this machine's cores, so on a small CPU machine expect little gain.
3. Weight-sync latency: on a LoRA training client (one training step first, so the adapter
   is non-zero), the time from `save_weights_and_get_sampling_client()` to the first token
   of `sample(..., max_tokens=1)` on the client it returns; repeated with a training step in
   between each, p50/p99.

4. `--backend vllm` (instead of 1-3): a stack with a vLLM sampler (under OPENRL_VLLM_PYTHON,
   scripts/vllm_env.sh) and one with a transformers sampler, both up at once on the head-64
   test model (tests/vllm_model.py), the same SDK requests to each in alternating
   repetitions: tokens/s and their ratio; then weight-sync latency on each. JSON to
   bench/results/sampling_vllm.json.

    python bench/sampling.py [--prompts 32] [--samples 2] [--max-tokens 64] [--reps 5] [--sync-reps 10] [--threads N] [--quick]
        [--backend transformers|vllm] [--out bench/results/sampling.json]

Prints the figures and writes them as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import API_KEY, start_stack, stop_stack, write_results

BASE_MODEL = "openrl/tiny-qwen3"
ROOT = Path(__file__).resolve().parent.parent


# -- the stack -------------------------------------------------------------------------


# -- workload --------------------------------------------------------------------------


def make_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """Chat prompts of the kinds the default model was warmed up on, token ids with the
    generation prompt appended."""
    import random

    rng = random.Random(seed)
    words = ["river", "apple", "stone", "cloud", "green", "piano", "tiger", "lemon", "orbit", "candle"]
    prompts = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            text = f"What is {rng.randint(10, 99)}+{rng.randint(10, 99)}?"
        elif kind == 1:
            text = f"Say the word: {rng.choice(words)}"
        else:
            text = "Repeat after me: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer.encode(chat, add_special_tokens=False))
    return prompts


def bare_runner(model_path: str, prompts: list[list[int]], samples: int, max_tokens: int):
    """The sampler's backend in this process: every prompt in one call, as one batch."""
    from openrl.bus.messages import SamplingParams
    from openrl.sampler.hf_model import TransformersSampler
    from openrl.sampler.spec import SampleSpec

    sampler = TransformersSampler(model_path, device="cpu")

    def run() -> tuple[float, int]:
        specs = [
            SampleSpec(prompt=list(p), num_samples=samples, params=SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, stop_at_eos=False))
            for i, p in enumerate(prompts)
        ]
        t0 = time.perf_counter()
        results = sampler.sample(specs)
        elapsed = time.perf_counter() - t0
        for r in results:
            if isinstance(r, Exception):
                raise r
        return elapsed, sum(len(s.tokens) for r in results for s in r.sequences)

    return run


def stack_runner(url: str, prompts: list[list[int]], samples: int, max_tokens: int, base_model: str = BASE_MODEL):
    """The unmodified tinker SDK on the base model: every prompt's `sample` future in flight at once."""
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    sc = service.create_sampling_client(base_model=base_model).result()
    inputs = [types.ModelInput.from_ints(p) for p in prompts]

    def run() -> tuple[float, int]:
        t0 = time.perf_counter()
        futures = [
            sc.sample(x, samples, types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, stop=[]))
            for i, x in enumerate(inputs)
        ]
        results = [f.result() for f in futures]
        elapsed = time.perf_counter() - t0
        return elapsed, sum(len(s.tokens) for r in results for s in r.sequences)

    return run


def summarize(runs: list[tuple[float, int]]) -> dict:
    secs = [t for t, _ in runs]
    tokens = [n for _, n in runs]
    med = float(np.median(secs))
    return {
        "reps": len(runs),
        "tokens_per_rep": tokens[0] if len(set(tokens)) == 1 else tokens,
        "seconds_median": round(med, 4),
        "seconds_min": round(min(secs), 4),
        "seconds_max": round(max(secs), 4),
        "tokens_per_s": round(float(np.median([n / t for t, n in runs])), 1),
    }


def interleaved(runners: dict, reps: int, warmup: int) -> tuple[dict, dict]:
    """One repetition of each in turn: every side sees the same machine conditions. Returns the
    summaries and the raw (seconds, tokens) runs by name."""
    runs = {name: [] for name in runners}
    for i in range(reps + warmup):
        for name, run in runners.items():
            r = run()
            if i >= warmup:
                runs[name].append(r)
    return {name: summarize(rs) for name, rs in runs.items()}, runs


def paired_ratio(stack: list[tuple[float, int]], bare: list[tuple[float, int]]) -> dict:
    """Stack/bare tokens/s of each back-to-back pair of repetitions: the host's speed drifts by
    more than the gap being measured on small shared VMs, and a pair sees the same conditions."""
    r = [(ns / ts) / (nb / tb) for (ts, ns), (tb, nb) in zip(stack, bare, strict=True)]
    return {
        "median": round(float(np.median(r)), 3),
        "p25": round(float(np.percentile(r, 25)), 3),
        "p75": round(float(np.percentile(r, 75)), 3),
        "all": [round(x, 3) for x in r],
    }


def compare(runners: dict, new: str, ref: str, reps: int, warmup: int, expected_tokens: int, target: str = "") -> dict:
    """`runners` (name -> run) in alternating repetitions, `new` measured against `ref`: each
    one's summary by name, "ratio" (new / ref tokens/s, of the medians) and "ratio_paired" (per
    back-to-back pair). Printed as it comes, with a warning where a side did not generate
    `expected_tokens` per repetition."""
    summaries, runs = interleaved(runners, reps, warmup)
    ratio = round(summaries[new]["tokens_per_s"] / summaries[ref]["tokens_per_s"], 3)
    rp = paired_ratio(runs[new], runs[ref])
    for name in (ref, new):
        s = summaries[name]
        print(f"{name}: {s['tokens_per_s']} tokens/s (median {s['seconds_median']} s per rep)", flush=True)
        if s["tokens_per_rep"] != expected_tokens:
            print(f"WARNING: {name} generated {s['tokens_per_rep']} tokens per rep, expected {expected_tokens}", flush=True)
    print(f"{new} / {ref} = {ratio:.3f} of the medians; per back-to-back pair: median {rp['median']:.3f} "
          f"(p25 {rp['p25']:.3f}, p75 {rp['p75']:.3f}){target}", flush=True)  # fmt: skip
    return {**summaries, "ratio": ratio, "ratio_paired": rp}


def repeated(run, reps: int, warmup: int) -> dict:
    for _ in range(warmup):
        run()
    return summarize([run() for _ in range(reps)])


def bench_weight_sync(url: str, tokenizer, prompt: list[int], reps: int, rank: int, base_model: str = BASE_MODEL) -> dict:
    """save_weights_and_get_sampling_client() -> first token of a max_tokens=1 sample on it."""
    import tinker
    from tinker import types

    from openrl.demo import make_datum, sft_examples

    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    tc = service.create_lora_training_client(base_model=base_model, rank=rank).result()
    data = [make_datum(tokenizer, q, a) for q, a in sft_examples(4, seed=1)]
    adam = types.AdamParams(learning_rate=1e-3)
    x = types.ModelInput.from_ints(prompt)
    params = types.SamplingParams(max_tokens=1, temperature=1.0, seed=0)

    def train_step() -> None:
        fb = tc.forward_backward(data, loss_fn="cross_entropy")
        opt = tc.optim_step(adam)
        fb.result()
        opt.result()

    def sync() -> tuple[float, float]:
        t0 = time.perf_counter()
        sc = tc.save_weights_and_get_sampling_client().result()
        t1 = time.perf_counter()
        out = sc.sample(x, 1, params).result()
        t2 = time.perf_counter()
        assert len(out.sequences[0].tokens) == 1
        return t1 - t0, t2 - t0

    train_step()  # the adapter's B starts at zero: make it non-zero first
    sync()  # warm-up: connections, the sampler's first adapter load into peft
    saves, totals = [], []
    for _ in range(reps):
        train_step()
        s, t = sync()
        saves.append(s)
        totals.append(t)
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1)  # noqa: E731
    return {
        "reps": reps,
        "rank": rank,
        "p50_ms": ms(totals, 50),
        "p99_ms": ms(totals, 99),
        "max_ms": ms(totals, 100),
        "save_p50_ms": ms(saves, 50),
        "first_token_after_save_p50_ms": ms([t - s for s, t in zip(saves, totals)], 50),
        "all_ms": [round(t * 1000, 1) for t in totals],
    }


# -- vLLM against transformers -------------------------------------------------------


def bench_vllm(args) -> None:
    """Two stacks up at once on the tiny head-64 model (tests/vllm_model.py; vLLM's CPU attention
    does not take the default model's head size 48), one with a vLLM sampler (run under
    OPENRL_VLLM_PYTHON), one with a transformers sampler; the same SDK requests to each, in
    alternating repetitions; then weight-sync latency on each."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TINKER_TELEMETRY"] = "0"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    vllm_python = os.environ.get("OPENRL_VLLM_PYTHON", "")
    if not vllm_python:
        sys.exit("--backend vllm needs OPENRL_VLLM_PYTHON: OPENRL_VLLM_PYTHON=$(bash scripts/vllm_env.sh | tail -1)")
    sys.path.insert(0, str(ROOT / "tests"))
    from transformers import AutoTokenizer
    from vllm_model import VLLM_MODEL, ensure_vllm_model

    ensure_vllm_model()
    tokenizer = AutoTokenizer.from_pretrained(VLLM_MODEL)
    prompts = make_prompts(tokenizer, args.prompts)
    cpus = len(os.sched_getaffinity(0))
    threads = args.threads or cpus
    expected = args.prompts * args.samples * args.max_tokens
    print(f"workload: {args.prompts} prompts x {args.samples} samples x {args.max_tokens} tokens = {expected} tokens per rep; "
          f"model {VLLM_MODEL}; sampler threads {threads}", flush=True)  # fmt: skip
    common = ("--base-model", VLLM_MODEL, "--samplers", "1", "--threads", str(threads))
    vllm_env = {"OPENRL_KV_CACHE_GIB": "1", "OPENRL_MAX_MODEL_LEN": "512", "OPENRL_ENFORCE_EAGER": "1", "OPENRL_MAX_LORA_RANK": "32",
                "OPENRL_MAX_LORAS": "4"}  # fmt: skip
    results: dict = {"machine": {"cpus": cpus, "sampler_threads": threads}, "model": VLLM_MODEL}
    with tempfile.TemporaryDirectory(prefix="openrl-bench-vllm-") as tmp:
        saved = {k: os.environ.get(k) for k in vllm_env}
        os.environ.update(vllm_env)
        try:
            vproc, vurl = start_stack(Path(tmp) / "vllm", *common, "--sampler-backend", "vllm", "--sampler-python", vllm_python)
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        tproc, turl = start_stack(Path(tmp) / "transformers", *common)
        try:
            runners = {name: stack_runner(url, prompts, args.samples, args.max_tokens, base_model=VLLM_MODEL)
                       for name, url in (("vllm", vurl), ("transformers", turl))}  # fmt: skip
            results.update(compare(runners, "vllm", "transformers", args.reps, args.warmup, expected))
            results["vllm_vs_transformers"] = results.pop("ratio")
            results["vllm_vs_transformers_paired"] = results.pop("ratio_paired")
            for name, url in (("vllm", vurl), ("transformers", turl)):
                results[f"weight_sync_{name}"] = w = bench_weight_sync(url, tokenizer, prompts[0], args.sync_reps, args.rank, base_model=VLLM_MODEL)
                print(f"weight sync, {name} sampler (save -> first token), rank {w['rank']}, {w['reps']} reps: p50 {w['p50_ms']} ms, "
                      f"p99 {w['p99_ms']} ms; save p50 {w['save_p50_ms']} ms, first token p50 {w['first_token_after_save_p50_ms']} ms",
                      flush=True)  # fmt: skip
        finally:
            stop_stack(vproc)
            stop_stack(tproc)
    results["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    write_results(args.out, results)


# -- main ------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="chat prompts per repetition")
    p.add_argument("--samples", type=int, default=2, help="num_samples per prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per sequence (stop=[]: always all of them)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per side first")
    p.add_argument("--sync-reps", type=int, default=10, help="timed weight syncs")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank of the weight-sync training client")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: all cores)")
    p.add_argument("--no-two-samplers", action="store_true", help="skip the --samplers 2 stack")
    p.add_argument("--quick", action="store_true", help="a tiny run to check the script: 4 prompts x 2 x 8 tokens, 2 reps, 3 syncs")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="vllm: a stack with a vLLM sampler against one with a transformers sampler, same requests "
                        "(bench_vllm; needs OPENRL_VLLM_PYTHON, scripts/vllm_env.sh)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.samples, args.max_tokens, args.reps, args.warmup, args.sync_reps = 4, 2, 8, 2, 1, 3
    args.out = args.out or str(ROOT / "bench" / "results" / ("sampling_vllm.json" if args.backend == "vllm" else "sampling.json"))
    if args.backend == "vllm":
        return bench_vllm(args)

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TINKER_TELEMETRY"] = "0"
    import torch
    from transformers import AutoTokenizer

    from openrl.default_model import ensure_default_model

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model_path = str(ensure_default_model())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = make_prompts(tokenizer, args.prompts)
    expected_tokens = args.prompts * args.samples * args.max_tokens
    workload = f"{args.prompts} prompts x {args.samples} samples x {args.max_tokens} tokens = {expected_tokens} tokens per rep"
    print(f"workload: {workload}; prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))}; torch threads {threads}", flush=True)

    results: dict = {"machine": {"cpus": len(os.sched_getaffinity(0)), "torch_threads": threads, "cuda": torch.cuda.is_available()}}
    bare = bare_runner(model_path, prompts, args.samples, args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="openrl-bench-sampling-") as tmp:
        proc, url = start_stack(Path(tmp) / "one", "--threads", str(threads), "--samplers", "1")
        try:
            stack = stack_runner(url, prompts, args.samples, args.max_tokens)
            # bare: the backend in this process; stack_1_sampler: through the stack, one sampler.
            runners = {"stack_1_sampler": stack, "bare": bare}
            results.update(compare(runners, "stack_1_sampler", "bare", args.reps, args.warmup, expected_tokens, " (target >= 0.90)"))
            if args.quick:
                print("(--quick: a few requests of a few tokens; per-request overhead dominates, the ratio says little)", flush=True)

            results["weight_sync"] = w = bench_weight_sync(url, tokenizer, prompts[0], args.sync_reps, args.rank)
            print(
                f"weight sync (save_weights_and_get_sampling_client -> first token), rank {w['rank']}, {w['reps']} reps: "
                f"p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms (target <= 200 ms); "
                f"of which save p50 {w['save_p50_ms']} ms, first token p50 {w['first_token_after_save_p50_ms']} ms",
                flush=True,
            )
        finally:
            stop_stack(proc)

        if not args.no_two_samplers:
            # The cores are shared out between the two samplers, as `openrl up` does by default.
            proc, url = start_stack(Path(tmp) / "two", "--threads", str(max(1, threads // 2)), "--samplers", "2")
            try:
                results["stack_2_samplers"] = t = repeated(stack_runner(url, prompts, args.samples, args.max_tokens), args.reps, args.warmup)
            finally:
                stop_stack(proc)
            results["two_vs_one_sampler"] = round(t["tokens_per_s"] / results["stack_1_sampler"]["tokens_per_s"], 3)
            print(
                f"through the stack, 2 samplers: {t['tokens_per_s']} tokens/s; 2 vs 1 = {results['two_vs_one_sampler']:.3f} "
                f"({results['machine']['cpus']} CPU cores, {max(1, threads // 2)} torch threads per sampler: the two samplers share "
                f"the same cores, so little gain is expected here; the gain comes with a device or cores per sampler)",
                flush=True,
            )

    results["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    write_results(args.out, results)


if __name__ == "__main__":
    main()

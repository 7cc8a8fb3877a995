"""The shared workload of issue 20: 1 and 6 concurrent toy RL jobs through the tinker SDK
against one `openrl up`, with CPU-seconds per process per RL step and weight sync.

Each job, each step: save weights and get a sampling client, sample 4 prompts x 4 samples x 8
tokens (temperature 1), a 200 ms I/O-bound reward per group (`asyncio.sleep(0.2)` in this
process, as a remote judge would be; the score is the fraction of even token ids), then an
`importance_sampling` forward_backward (advantage = reward - group mean) and an optim_step.
The jobs run as asyncio tasks of this process on the SDK's async API, all at once.

Per model (the tiny Llama the open-rl figures were measured with: vocab 4,096, hidden 128,
intermediate 256, 2 layers, 4 heads, untied embeddings, seed 0, a word-level tokenizer of the
numbers 0..4095, built here into the HF cache as `openrl-bench/tiny-llama`; and the default
model), one stack:
- a warm-up job, then 1 job and 6 jobs: RL steps per second (all jobs' steps / wall) and
  the ratio; CPU-seconds of nats-server, gateway, trainer, sampler(s) and this process
  (utime + stime from /proc/<pid>/stat, before and after) per RL step;
- weight sync: after a forward_backward + optim_step, the time from the save call to the
  first sampled token with the new weights (a 1-token sample on the new sampling client), p50.

    python bench/jobs.py [--steps 8] [--models llama,default] [--out bench/results/jobs.json]
    python bench/jobs.py --only-sync --models default [--sync-n 30] [--baseline-tree DIR]

`--only-sync` measures only the weight sync (p50, p90, and the split: until the SDK's
save_weights_and_get_sampling_client returned, then the sample), on this tree and, with
`--baseline-tree DIR` (e.g. `git worktree add DIR <rev>`), on a second stack from DIR, the two
taking turns in blocks of 5 so machine load hits both alike.

Prints the figures and writes them as JSON, with the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import API_KEY, cpu_by_kind, finish_results, machine, stack_processes, start_stack, stop_stack

ROOT = Path(__file__).resolve().parent.parent
LLAMA = "openrl-bench/tiny-llama"
LLAMA_ARCH = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
PROMPTS, SAMPLES, TOKENS, REWARD_S = 4, 4, 8, 0.2
# A job step's parts, timed in the client (p50 per phase): the save call, the four groups'
# sampling with their 200 ms reward (concurrent), forward_backward + optim_step.
STEP_PARTS = ("save_ms", "sample_and_reward_ms", "train_ms")


def ensure_llama() -> Path:
    """The tiny Llama's snapshot in the HF cache (HF_HOME), built on first use (seconds, offline)."""
    import tokenizers
    import torch
    import transformers
    from huggingface_hub import constants
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    key = json.dumps([LLAMA_ARCH, 0, "wordlevel-numbers", torch.__version__, transformers.__version__, tokenizers.__version__], sort_keys=True)
    revision = hashlib.sha256(key.encode()).hexdigest()[:40]
    repo = Path(constants.HF_HUB_CACHE) / ("models--" + LLAMA.replace("/", "--"))
    snap = repo / "snapshots" / revision
    if not (snap / "config.json").exists():
        vocab = {str(i): i for i in range(LLAMA_ARCH["vocab_size"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        from tokenizers import decoders

        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="0", eos_token="1", pad_token="0", bos_token="2")
        config = LlamaConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0, torch_dtype="float32", **LLAMA_ARCH)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).float()
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=repo.parent if repo.parent.exists() else None))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        snap.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


async def sample_group(sampler, prompt: list[int], seed: int):
    """One group: SAMPLES completions of TOKENS tokens, then the 200 ms I/O-bound reward."""
    from tinker import types

    resp = await sampler.sample(types.ModelInput.from_ints(prompt), SAMPLES,
                                types.SamplingParams(max_tokens=TOKENS, temperature=1.0, seed=seed))  # fmt: skip
    seqs = [list(s.tokens) for s in resp.sequences]
    await asyncio.sleep(REWARD_S)
    rewards = [sum(t % 2 == 0 for t in s) / max(len(s), 1) for s in seqs]
    return prompt, seqs, [list(s.logprobs) for s in resp.sequences], rewards


def datums(prompt: list[int], seqs, logprobs, rewards) -> list:
    from tinker import types

    mean = sum(rewards) / len(rewards)
    out = []
    n_prompt = len(prompt) - 1
    for tokens, lps, r in zip(seqs, logprobs, rewards):
        if not tokens or abs(r - mean) < 1e-9:
            continue
        full = prompt + tokens
        out.append(types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                               loss_fn_inputs={"target_tokens": full[1:], "logprobs": [0.0] * n_prompt + lps,
                                               "advantages": [0.0] * n_prompt + [r - mean] * len(tokens)}))  # fmt: skip
    return out


async def job(service, base_model: str, steps: int, seed: int, vocab: int, parts: list | None = None) -> int:
    """A toy RL job; returns the steps it trained. With `parts`, appends each step's split in
    seconds: (save and get the sampling client, sampling and reward, forward_backward + optim_step)."""
    from tinker import types

    rng = random.Random(seed)
    tc = await service.create_lora_training_client(base_model=base_model, rank=8, seed=seed)
    adam = types.AdamParams(learning_rate=1e-4)
    for step in range(steps):
        t0 = time.perf_counter()
        sampler = await tc.save_weights_and_get_sampling_client()
        t1 = time.perf_counter()
        prompts = [[rng.randrange(3, vocab) for _ in range(8)] for _ in range(PROMPTS)]
        groups = await asyncio.gather(*(sample_group(sampler, p, seed * 1000 + step * PROMPTS + i) for i, p in enumerate(prompts)))
        data = [d for g in groups for d in datums(*g)]
        t2 = time.perf_counter()
        if data:
            fb = tc.forward_backward(data, loss_fn="importance_sampling")
            opt = tc.optim_step(adam)
            await fb
            await opt
        if parts is not None:
            parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return steps


async def phase(url: str, base_model: str, jobs: int, steps: int, procs: dict[int, str], vocab: int, seed0: int) -> dict:
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    parts: list[tuple[float, float, float]] = []
    before, t0 = cpu_by_kind(procs), time.monotonic()
    done = await asyncio.gather(*(job(service, base_model, steps, seed0 + j, vocab, parts) for j in range(jobs)))
    wall = time.monotonic() - t0
    after = cpu_by_kind(procs)
    total = sum(done)
    cpu = {k: round((after[k] - before.get(k, 0.0)) / total, 4) for k in after}
    split = {name: round(float(np.median([p[i] for p in parts])) * 1000, 1) for i, name in enumerate(STEP_PARTS)}
    return {"jobs": jobs, "steps_per_job": steps, "rl_steps": total, "wall_s": round(wall, 2), "steps_per_s": round(total / wall, 3),
            "cpu_s_per_step": cpu, "cpu_s_per_step_total": round(sum(cpu.values()), 4), "step_p50_ms": split}  # fmt: skip


class WeightSync:
    """save -> the first token sampled with the new weights, after a real training step each time,
    on one training client of one stack. `save_ms`: until save_weights_and_get_sampling_client
    returned (the SDK's save POST and its future); `sample_ms`: the 1-token sample after it."""

    def __init__(self, url: str, base_model: str):
        self.url, self.base_model = url, base_model
        self.times: list[tuple[float, float]] = []

    async def start(self) -> None:
        import tinker
        from tinker import types

        self.service = tinker.ServiceClient(base_url=self.url, api_key=API_KEY)
        self.tc = await self.service.create_lora_training_client(base_model=self.base_model, rank=8, seed=99)
        self.adam = types.AdamParams(learning_rate=1e-4)
        self.i = 0
        await self.measure(2, keep=False)  # the first two warm the paths

    async def measure(self, n: int, keep: bool = True) -> None:
        from tinker import types

        prompt = list(range(3, 11))
        for _ in range(n):
            self.i += 1
            sampler = await self.tc.save_weights_and_get_sampling_client()
            g = await sample_group(sampler, prompt, self.i)
            data = datums(*g) or datums(g[0], g[1], g[2], [1.0] + [0.0] * (len(g[1]) - 1))
            fb, opt = self.tc.forward_backward(data, loss_fn="importance_sampling"), self.tc.optim_step(self.adam)
            await fb
            await opt
            t0 = time.perf_counter()
            sampler = await self.tc.save_weights_and_get_sampling_client()
            t1 = time.perf_counter()
            await sampler.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=1, temperature=1.0, seed=self.i))
            if keep:
                self.times.append((t1 - t0, time.perf_counter() - t1))

    def summary(self) -> dict:
        total = [a + b for a, b in self.times]

        def ms(xs, q):
            return round(float(np.percentile(xs, q)) * 1000, 1)

        return {"n": len(total), "p50_ms": ms(total, 50), "p90_ms": ms(total, 90), "min_ms": round(min(total) * 1000, 1),
                "max_ms": round(max(total) * 1000, 1), "save_p50_ms": ms([a for a, _ in self.times], 50),
                "sample_p50_ms": ms([b for _, b in self.times], 50)}  # fmt: skip


async def weight_sync(urls: dict[str, str], base_model: str, n: int, block: int = 5) -> dict:
    """`WeightSync` on each stack (name -> URL), taking turns in blocks of `block`, so machine
    load hits them alike."""
    syncs = {name: WeightSync(url, base_model) for name, url in urls.items()}
    for s in syncs.values():
        await s.start()
    for start in range(0, n, block):
        for s in syncs.values():
            await s.measure(min(block, n - start))
    return {name: s.summary() for name, s in syncs.items()}


def run_model(name: str, base_model: str, vocab: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="openrl-bench-jobs-") as tmp:
        proc, url = start_stack(Path(tmp), "--base-model", base_model, "--threads", str(args.threads))
        try:
            procs = stack_processes(proc.pid)
            out = {"base_model": base_model, "processes": sorted(procs.values())}
            asyncio.run(phase(url, base_model, 1, 2, procs, vocab, 500))  # warm-up: tokenizer, adapters, code paths
            for jobs in (1, args.jobs):
                row = asyncio.run(phase(url, base_model, jobs, args.steps, procs, vocab, 100 * jobs))
                out[f"jobs_{jobs}"] = row
                print(f"{name}: {jobs} job(s): {row['steps_per_s']} RL steps/s; CPU-s per RL step {row['cpu_s_per_step']}; "
                      f"a job's step, p50 ms: {row['step_p50_ms']}", flush=True)  # fmt: skip
            out["ratio"] = round(out[f"jobs_{args.jobs}"]["steps_per_s"] / out["jobs_1"]["steps_per_s"], 3)
            out["weight_sync"] = asyncio.run(weight_sync({"this": url}, base_model, args.sync_n))["this"]
            print(f"{name}: {args.jobs} jobs / 1 job = {out['ratio']}; weight sync p50 {out['weight_sync']['p50_ms']} ms", flush=True)
            return out
        finally:
            stop_stack(proc)


def run_sync(name: str, base_model: str, args) -> dict:
    """Only the weight sync (`--only-sync`), on this tree's stack and, with --baseline-tree,
    on a second stack run from that tree (its working directory, so its `openrl` comes first),
    in alternating blocks."""
    trees = {"this": str(ROOT)} | ({"baseline": str(Path(args.baseline_tree).resolve())} if args.baseline_tree else {})
    stacks = {}
    with tempfile.TemporaryDirectory(prefix="openrl-bench-sync-") as tmp:
        try:
            for tree_name, tree in trees.items():
                stacks[tree_name] = start_stack(Path(tmp) / tree_name, "--base-model", base_model, "--threads", str(args.threads), cwd=tree)
            out = {"base_model": base_model, "trees": trees}
            out |= asyncio.run(weight_sync({k: url for k, (_, url) in stacks.items()}, base_model, args.sync_n))
            for tree_name in trees:
                r = out[tree_name]
                print(f"{name} [{tree_name}]: weight sync p50 {r['p50_ms']} ms, p90 {r['p90_ms']} ms "
                      f"(save {r['save_p50_ms']}, sample {r['sample_p50_ms']})", flush=True)  # fmt: skip
            if "baseline" in out:
                out["ratio_p50"] = round(out["baseline"]["p50_ms"] / out["this"]["p50_ms"], 3)
                print(f"{name}: baseline / this, weight sync p50: {out['ratio_p50']}", flush=True)
            return out
        finally:
            for proc, _ in stacks.values():
                stop_stack(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="RL steps per job in each phase")
    p.add_argument("--jobs", type=int, default=6, help="concurrent jobs of the second phase")
    p.add_argument("--models", default="llama,default")
    p.add_argument("--sync-n", type=int, default=10, help="weight-sync measurements (per tree)")
    p.add_argument("--only-sync", action="store_true", help="only the weight sync (about a minute per model)")
    p.add_argument("--baseline-tree", default="", help="with --only-sync: a source tree to measure against, in alternating blocks")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--out", default="", help="default bench/results/jobs.json (weight_sync.json with --only-sync)")
    args = p.parse_args()
    args.out = args.out or str(ROOT / "bench" / "results" / ("weight_sync.json" if args.only_sync else "jobs.json"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    started = time.perf_counter()
    results: dict = {"machine": machine(),
                     "workload": {"prompts": PROMPTS, "samples": SAMPLES, "tokens": TOKENS, "reward_s_per_group": REWARD_S,
                                  "reward": "asyncio.sleep in the bench process", "loss_fn": "importance_sampling"}}  # fmt: skip
    if args.baseline_tree and not args.only_sync:
        p.error("--baseline-tree needs --only-sync")
    for name in args.models.split(","):
        if name == "llama":
            ensure_llama()
            base_model, vocab = LLAMA, lambda: LLAMA_ARCH["vocab_size"]
        else:
            from transformers import AutoTokenizer

            from openrl.default_model import DEFAULT_MODEL, ensure_default_model

            # Prompts of ids the tokenizer has (the model's vocab is padded past them).
            base_model, vocab = DEFAULT_MODEL, lambda: len(AutoTokenizer.from_pretrained(ensure_default_model()))
        results[name] = run_sync(name, base_model, args) if args.only_sync else run_model(name, base_model, vocab(), args)
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

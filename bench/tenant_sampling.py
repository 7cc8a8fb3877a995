"""Tenant batching in the sampler, in process, on CPU: 8 tenants x 4 sequences sampled in
shared passes (one `TransformersSampler.sample` over every tenant's request: each decode step
is one batch whose rows pick their tenant's LoRA slot) against the same work one tenant at a
time (a `sample` call per tenant), on the wider random Qwen3 of bench/lora_slots.py (hidden
1024, intermediate 3072, 4 layers) where the matmuls matter. Generated tokens per second, the
ratio, and whether each tenant got the same result both ways (seeded sampling: the same
tokens; the largest logprob difference).

    python bench/tenant_sampling.py [--reps 5] [--tenants 8] [--seqs 4] [--tokens 32] [--threads 1]

JSON in bench/results/tenant_sampling.json. Repetitions alternate shared / alone, so the
machine's load affects both alike; compare the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import finish_results, machine
from lora_slots import ALPHA, TARGETS, configs, random_state

ROOT = Path(__file__).resolve().parent.parent


def specs(args, vocab: int) -> list:
    import numpy as np

    from openrl.bus.messages import SamplingParams
    from openrl.sampler.spec import SampleSpec

    rng = np.random.default_rng(0)
    return [
        SampleSpec(
            prompt=rng.integers(0, vocab, args.prompt).tolist(),
            num_samples=args.seqs,
            params=SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=1000 + t, stop_at_eos=False),
            adapter=f"tenant-{t}",
            owner=f"key-{t}",
        )
        for t in range(args.tenants)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--seqs", type=int, default=4, help="sequences per tenant (num_samples)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tenant_sampling.json")
    args = p.parse_args()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from openrl.sampler.hf_model import TransformersSampler

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"machine": machine()}
    config = configs()["wide_qwen3"]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config)
        base.save_pretrained(tmp)
        sampler = TransformersSampler(tmp, device="cpu", dtype=torch.float32, max_adapters=args.tenants, max_batch_rows=256)
        for t in range(args.tenants):
            state = random_state(base, args.rank, seed=t)
            sampler.load_adapter(f"tenant-{t}", state, rank=args.rank, alpha=ALPHA, target_modules=TARGETS)
        del base
        work = specs(args, config.vocab_size)
        tokens = args.tenants * args.seqs * args.tokens
        sampler.sample(work[:1])  # warm-up
        shared_s, alone_s = [], []
        for rep in range(args.reps):
            t = time.perf_counter()
            together = sampler.sample(work)
            shared_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            alone = [sampler.sample([spec])[0] for spec in work]
            alone_s.append(time.perf_counter() - t)
            print(f"rep {rep}: shared {tokens / shared_s[-1]:.0f} tok/s, one tenant at a time {tokens / alone_s[-1]:.0f} tok/s", flush=True)
    same_tokens = all(
        np.array_equal(a.tokens, b.tokens) for x, y in zip(together, alone, strict=True) for a, b in zip(x.sequences, y.sequences, strict=True)
    )
    diff = max(
        float(np.abs(a.logprobs - b.logprobs).max()) for x, y in zip(together, alone, strict=True) for a, b in zip(x.sequences, y.sequences, strict=True)
    )
    shared, alone = statistics.median(shared_s), statistics.median(alone_s)
    results["tenant_sampling_wide_qwen3"] = {
        "tenants": args.tenants, "sequences_per_tenant": args.seqs, "prompt_tokens": args.prompt, "tokens_per_sequence": args.tokens,
        "rank": args.rank, "shared_tokens_per_s": round(tokens / shared, 1), "alone_tokens_per_s": round(tokens / alone, 1),
        "shared_over_alone": round(alone / shared, 2), "same_tokens": same_tokens, "max_logprob_diff": diff,
    }  # fmt: skip
    print(results["tenant_sampling_wide_qwen3"], flush=True)
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()

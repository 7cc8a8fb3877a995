"""What creating (and dropping) a LoRA tenant costs the trainer as tenants accumulate.

A random Qwen3 with Qwen3-8B's depth and module layout (36 layers, attention + MLP + head
targeted: 253 LoRA layers) but tiny widths, so the figures are the bookkeeping, not the
matmuls. Two engines take the same creates, alternating one by one:
- direct: a tenant is added to (and dropped from) the LoRA layers already there, what
  `LoraEngine.create` and `drop` do now;
- peft: through peft's `add_adapter` and `delete_adapter` (`direct_layers = False`: walks over
  every module and parameter).
Prints and writes the milliseconds of a create at several tenant counts (the median of the
three creates around each count) and their ratio; then what a drop costs at the end.

    python bench/create.py [--tenants 64] [--layers 36] [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import finish_results

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=int, default=64)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="a tiny run to check that it works")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "create.json"))
    args = p.parse_args()
    if args.quick:
        args.tenants, args.layers = 8, 4
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import structlog
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from openrl.bus.messages import LoraSpec
    from openrl.trainer.engine import LoraEngine

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    torch.set_num_threads(1)
    started = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="openrl-bench-create-")
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    engines = {"direct": LoraEngine(folder, device="cpu"), "peft": LoraEngine(folder, device="cpu")}
    engines["peft"].direct_layers = False
    times: dict[str, list[float]] = {k: [] for k in engines}
    for i in range(args.tenants):
        for name, engine in engines.items():
            t = time.perf_counter()
            engine.create(f"m{i}", LoraSpec(rank=args.rank, seed=i))
            times[name].append(time.perf_counter() - t)
    counts = sorted({c for c in (2, 8, 16, 32, 48, 64, 128, args.tenants) if 2 <= c <= args.tenants})
    at = {}
    for c in counts:
        window = slice(max(0, c - 2), min(args.tenants, c + 1))  # creates number c-1, c, c+1 (1-based)
        ms = {k: 1000 * float(np.median(v[window])) for k, v in times.items()}
        at[str(c)] = {**{k: round(v, 1) for k, v in ms.items()}, "peft_over_direct": round(ms["peft"] / ms["direct"], 2)}
        print(f"create with ~{c:3d} tenants: direct {ms['direct']:7.1f} ms, peft {ms['peft']:7.1f} ms ({at[str(c)]['peft_over_direct']}x)")
    drops = {}
    for name, engine in engines.items():
        t = time.perf_counter()
        engine.drop("m1")
        drops[name] = round(1000 * (time.perf_counter() - t), 1)
    print(f"a drop with {args.tenants} tenants: direct {drops['direct']} ms, peft {drops['peft']} ms")
    layers = len(engines["direct"]._peft_layers())
    results = {"model": {"layers": args.layers, "lora_layers": layers, "rank": args.rank}, "create_ms": at, "drop_ms": drops}
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()

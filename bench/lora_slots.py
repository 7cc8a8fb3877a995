"""LoRA slots against peft, in process, on CPU: what loading a weights version and a forward over
rows of many adapters cost.

1. Weight-version load (the sampler's part of weight sync): `TransformersSampler.load_adapter`
   (a copy into a slot) against what it did before (peft `add_adapter`, copy, `delete_adapter`
   of the previous version), rank 32 on every target (attention, MLP, head), p50 ms.
2. A forward over rows of several adapters (6 tenants x 4 prompts x 4 samples = 96 rows, plus
   base rows): slots grouped by slot (the module's way: one matmul pair per adapter), slots
   gathered per row (A[idx], B[idx] then bmm: the other way), slots dense (every row against
   all slots' A at once, masked to its own slot, then all B: 4 ops, not 6 per slot; the
   module's way for decode steps), and peft's mixed-adapter forward (`adapter_names=`), for a
   decode step (one token per row) and a prefill (16 tokens per row).
   Also the base model alone. Medians of interleaved repetitions, so machine load affects all alike.
3. Tenant batching in the trainer: 8 tenants x 4 sequences x 64 tokens of forward_backward in
   one shared call (`LoraEngine.forward_backward_many`; its LoRA terms grouped per tenant, in
   the dense form, and as the engine picks) vs one tenant at a time, tokens/s, on
   the wider Qwen3; and the largest logprob difference between the two. `--only-training`
   also runs it with activation checkpointing on (the CUDA default; shared passes recompute
   each layer on its route), on the wider Qwen3 (64 tokens) and the default shape (16 tokens).

Models (random weights, built in process): the default model's shape (Qwen3, hidden 192, 4
layers, vocab 1024), the tiny Llama of issue 20 (vocab 4096, hidden 128, intermediate 256, 2
layers, 4 heads, untied), and a wider Qwen3 (hidden 1024, intermediate 3072, 4 layers) where
the matmuls matter.

    python bench/lora_slots.py [--reps 30] [--threads 1] [--out bench/results/lora_slots.json]
    python bench/lora_slots.py --only-training --reps 12 --out bench/results/lora_slots_training.json
    python bench/lora_slots.py --only-forward --reps 12 --out bench/results/lora_slots_forward.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from common import finish_results, machine

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
ALPHA = 32


def configs():
    from transformers import LlamaConfig, Qwen3Config

    from openrl.default_model import ARCH

    return {
        "default_shape": Qwen3Config(vocab_size=1024, **ARCH),
        "tiny_llama": LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),  # fmt: skip
        "wide_qwen3": Qwen3Config(vocab_size=4096, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=64),  # fmt: skip
    }


def random_state(model, rank: int, seed: int):
    import torch

    from openrl.lora_slots import PREFIX

    g = torch.Generator().manual_seed(seed)
    return {
        f"{PREFIX}{n}.lora_{ab}.weight": torch.randn(shape, generator=g) * 0.02
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS
        for ab, shape in (("A", (rank, m.in_features)), ("B", (m.out_features, rank)))
    }


def p50_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 3)


def bench_load(path: str, reps: int) -> dict:
    """ms per new weights version: slots (the sampler today) vs peft add/copy/delete (before)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from openrl.sampler.hf_model import TransformersSampler

    sampler = TransformersSampler(path, device="cpu", max_adapters=8)
    base = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    states = [random_state(base, 32, s) for s in range(4)]
    config = LoraConfig(r=32, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(base, config, adapter_name="p0")
    slots_s, peft_s = [], []
    for v in range(1, reps + 1):
        state = states[v % len(states)]
        t = time.perf_counter()
        sampler.load_adapter(f"m@{v}", state, rank=32, alpha=ALPHA, target_modules=TARGETS)
        slots_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.add_adapter(f"p{v}", config)
            params = {n.replace(f".p{v}.", "."): p for n, p in peft.named_parameters() if f".p{v}." in n}
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(state[k])
            peft.delete_adapter(f"p{v - 1}")
        peft_s.append(time.perf_counter() - t)
    return {"slots_p50_ms": p50_ms(slots_s), "peft_p50_ms": p50_ms(peft_s), "peft_over_slots": round(statistics.median(peft_s) / statistics.median(slots_s), 2)}


def gather_forward(self, x):
    """SlotLinear.forward, the other way: every row's A and B gathered, then batched matmuls."""
    import torch

    y = self.base(x)
    idx = self._owner[0].row_slots
    if idx is None:
        return y
    scale = self._owner[0].row_scales  # [B], 0 for base rows and slots that skip this module
    on = torch.tensor(self.on, device=x.device)[idx.clamp(min=0)] & (idx >= 0)
    a = self.A[idx.clamp(min=0)]  # [B, r, in]
    bt = self.Bt[idx.clamp(min=0)]  # [B, r, out]
    h = torch.bmm(x, a.transpose(1, 2))  # [B, T, r]
    return y + torch.bmm(h, bt) * (scale * on)[:, None, None]


def bench_forward(name: str, config, reps: int, tenants: int = 6, rows_per_tenant: int = 16, base_rows: int = 8) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from openrl.lora_slots import BASE, LoraSlots, SlotLinear

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    states = [random_state(base, 32, s) for s in range(tenants)]
    model = copy.deepcopy(base)
    slots = LoraSlots(model, num_slots=tenants, rank=32)
    for s, state in enumerate(states):
        slots.load(s, slots.check(state, 32), rank=32, alpha=ALPHA)
    lora = LoraConfig(r=32, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(base), lora, adapter_name="t0").eval()
        for s in range(1, tenants):
            peft.add_adapter(f"t{s}", lora)
    with torch.no_grad():
        for s, state in enumerate(states):
            params = {n.replace(f".t{s}.", "."): p for n, p in peft.named_parameters() if f".t{s}." in n}
            for k, p in params.items():
                p.copy_(state[k])
    row_slot = [s for s in range(tenants) for _ in range(rows_per_tenant)] + [BASE] * base_rows
    # Rows arrive interleaved in a running batch, not sorted by tenant.
    order = torch.randperm(len(row_slot), generator=torch.Generator().manual_seed(1)).tolist()
    row_slot = [row_slot[i] for i in order]
    names = ["__base__" if s == BASE else f"t{s}" for s in row_slot]
    idx = torch.tensor(row_slot)
    scales = torch.tensor([0.0 if s == BASE else ALPHA / 32 for s in row_slot])
    out = {"rows": len(row_slot), "tenants": tenants}
    for phase, width in (("decode", 1), ("prefill", 16)):
        ids = torch.randint(0, config.vocab_size, (len(row_slot), width))
        owner = slots
        segments_forward = SlotLinear.forward

        def run_slots():
            slots.set_form("grouped")  # grouped by slot, whatever the length
            try:
                with slots.route(row_slot):
                    return model(input_ids=ids).logits
            finally:
                slots.set_form("auto")

        def run_dense():
            slots.set_form("dense")
            slots.dense_max_tokens = width  # the dense route in every layer, prefill too
            try:
                with slots.route(row_slot):
                    assert slots.dense is not None
                    return model(input_ids=ids).logits
            finally:
                slots.set_form("auto")

        def run_auto():  # the module's own choice, layer by layer
            with slots.route(row_slot):
                return model(input_ids=ids).logits

        def run_gather():
            SlotLinear.forward = gather_forward
            owner.row_slots, owner.row_scales = idx, scales
            try:
                return model(input_ids=ids).logits
            finally:
                SlotLinear.forward = segments_forward
                owner.row_slots = None

        cases = {
            "slots_grouped": run_slots,
            "slots_dense": run_dense,
            "slots_auto": run_auto,
            "slots_gathered": run_gather,
            "peft_mixed": lambda: peft(input_ids=ids, adapter_names=names).logits,
            "base_only": lambda: base(input_ids=ids).logits,
        }
        with torch.no_grad():
            ref = run_slots()
            for case, fn in cases.items():  # the same numbers, whichever way (not for base_only)
                if case != "base_only":
                    err = (fn() - ref).abs().max().item()
                    assert err < 1e-3, (case, err)
            times = {case: [] for case in cases}
            for _ in range(reps):
                for case, fn in cases.items():
                    t = time.perf_counter()
                    fn()
                    times[case].append(time.perf_counter() - t)
        med = {case: p50_ms(ts) for case, ts in times.items()}
        out[phase] = {
            **{f"{case}_p50_ms": v for case, v in med.items()},
            "peft_over_grouped": round(med["peft_mixed"] / med["slots_grouped"], 2),
            "gathered_over_grouped": round(med["slots_gathered"] / med["slots_grouped"], 2),
            "grouped_over_dense": round(med["slots_grouped"] / med["slots_dense"], 2),
            "grouped_over_auto": round(med["slots_grouped"] / med["slots_auto"], 2),
        }
        print(name, phase, out[phase], flush=True)
    return out


def bench_tenant_batching(config, reps: int, tenants: int = 8, seqs: int = 4, length: int = 64, checkpointing: bool = False) -> dict:
    """The trainer: `tenants` forward_backward requests of `seqs` x `length` tokens, in one
    shared call (forward_backward_many) vs one request at a time; tokens/s and the largest
    difference between their logprobs. `checkpointing`: activation checkpointing of the decoder
    layers (both ways recompute them in the backward pass)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from openrl.bus.messages import Datum, ForwardBackward, LoraSpec, Tensor
    from openrl.trainer.engine import LoraEngine

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        engine = LoraEngine(tmp, device="cpu", activation_checkpointing=checkpointing)
    rng = np.random.default_rng(0)
    reqs = []
    for t in range(tenants):
        engine.create(f"m{t}", LoraSpec(rank=32, seed=t))
        data = []
        for _ in range(seqs):
            tokens = rng.integers(0, config.vocab_size, length)
            target = Tensor(data=rng.integers(0, config.vocab_size, length).astype("<i8").tobytes(), dtype="int64", shape=[length])
            data.append(Datum(tokens=tokens.astype("<i4").tobytes(), loss_fn_inputs={"target_tokens": target}))
        reqs.append(ForwardBackward(request_id=f"r{t}", model_id=f"m{t}", seq_id=1, loss_fn="cross_entropy", data=data))
    shared_s, dense_s, auto_s, alone_s, diff, dense_diff = [], [], [], [], 0.0, 0.0
    for rep in range(reps):
        engine.dense_shared_passes = False  # grouped: a matmul pair per tenant in each layer
        t0 = time.perf_counter()
        shared = engine.forward_backward_many(reqs)
        shared_s.append(time.perf_counter() - t0)
        engine.dense_shared_passes = True  # the dense form: every tenant's LoRA terms of a layer in one pass
        t0 = time.perf_counter()
        dense = engine.forward_backward_many(reqs)
        dense_s.append(time.perf_counter() - t0)
        engine.dense_shared_passes = None  # the engine's own choice, layer by layer
        t0 = time.perf_counter()
        engine.forward_backward_many(reqs)
        auto_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        alone = [engine.forward_backward(r) for r in reqs]
        alone_s.append(time.perf_counter() - t0)
        if rep == 0:
            diff = max(float(np.abs(a - b).max()) for x, y in zip(shared, alone) for a, b in zip(x.logprobs, y.logprobs))
            dense_diff = max(float(np.abs(a - b).max()) for x, y in zip(dense, alone) for a, b in zip(x.logprobs, y.logprobs))
    tokens = tenants * seqs * length
    out = {
        "tenants": tenants, "sequences_per_tenant": seqs, "tokens_per_sequence": length, "activation_checkpointing": checkpointing,
        "shared_tokens_per_s": round(tokens / statistics.median(shared_s), 1),
        "alone_tokens_per_s": round(tokens / statistics.median(alone_s), 1),
        "shared_over_alone": round(statistics.median(alone_s) / statistics.median(shared_s), 2),
        "max_logprob_diff": diff,
        "dense_tokens_per_s": round(tokens / statistics.median(dense_s), 1),
        "dense_over_alone": round(statistics.median(alone_s) / statistics.median(dense_s), 2),
        "dense_max_logprob_diff": dense_diff,
        "auto_tokens_per_s": round(tokens / statistics.median(auto_s), 1),
        "auto_over_alone": round(statistics.median(alone_s) / statistics.median(auto_s), 2),
    }  # fmt: skip
    print("tenant batching", out, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only-training", action="store_true", help="the load and tenant-batching parts only")
    p.add_argument("--only-forward", action="store_true", help="the forward over rows of many adapters only")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_slots.json")
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"machine": machine()}
    cfgs = configs()
    if args.only_forward:
        for name, cfg in cfgs.items():
            results[f"forward_{name}"] = bench_forward(name, cfg, args.reps)
        return finish_results(args.out, results, args, started)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfgs["default_shape"]).save_pretrained(tmp)
        results["load_default_shape"] = bench_load(tmp, args.reps)
        print("load", results["load_default_shape"], flush=True)
    results["tenant_batching_wide_qwen3"] = bench_tenant_batching(cfgs["wide_qwen3"], max(3, args.reps // 4))
    if args.only_training:
        reps = max(3, args.reps // 4)
        results["tenant_batching_wide_qwen3_checkpointing"] = bench_tenant_batching(cfgs["wide_qwen3"], reps, checkpointing=True)
        # Small passes are quick: more repetitions, for a steadier median on a shared machine.
        results["tenant_batching_default_shape_16_tokens"] = bench_tenant_batching(cfgs["default_shape"], args.reps, length=16)
        results["tenant_batching_default_shape_16_tokens_checkpointing"] = bench_tenant_batching(
            cfgs["default_shape"], args.reps, length=16, checkpointing=True
        )
        return finish_results(args.out, results, args, started)
    for name, cfg in cfgs.items():
        results[f"forward_{name}"] = bench_forward(name, cfg, args.reps)
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()

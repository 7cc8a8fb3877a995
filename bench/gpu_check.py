"""The GPU check (issue 14): a cookbook-sized RL step on a random-init Qwen3-8B through the whole
stack, against a bare torch + peft loop on the same batches, in one run.

1. Build Qwen3-8B's config (hidden 4096, 36 layers, vocab 151,936, untied head) with random
   weights in bf16 directly on the GPU (no download) and save it to local disk: the trainer
   loads its base model by path.
2. `openrl up --base-model <that path> --samplers 0` (NATS, gateway, trainer on CUDA) and,
   through the tinker SDK, RL steps of 64 x 1,024 tokens: forward_backward(importance_sampling)
   + optim_step. tokens/s, MFU = 6 x parameters x tokens/s / the GPU's bf16 dense peak, and
   the peak GPU memory of the device while the stack runs (less what was in use before it
   started: the trainer's weights, activations and allocator cache, and its CUDA context).
3. The stack stopped, a bare loop: the saved model loaded with transformers, peft LoRA rank 32
   on the modules the trainer targets, activation checkpointing as the trainer has it on CUDA,
   micro-batches of --bare-microbatch-tokens, full-vocabulary logits, the same loss and AdamW
   on the same batches. tokens/s, MFU, torch's peak allocated memory; stack / bare (the target
   is >= 0.90). Step 0's loss from both (the LoRA starts at zero, so both are the base model's)
   is a check that they computed the same thing.
4. Tenant batching (issue 20), in process on the trainer's engine (`LoraEngine`, activation
   checkpointing on, as on CUDA by default): --tenants (8) models x 4 sequences x
   --tenant-length (256) tokens of forward_backward, all in one shared call
   (`forward_backward_many`, every row through its own tenant's LoRA, checkpointed layers
   recomputed on that route) against one tenant at a time, alternating; tokens/s of each,
   shared / alone, and the largest logprob and loss difference between the two (bf16). The
   shared call both ways (`LoraEngine.dense_shared_passes`): grouped (a matmul pair per tenant
   in each layer) and dense (every tenant's LoRA terms of a layer in one pass; the default on
   a GPU, from an estimate), so the first GPU run says which form a GPU should use.
5. The shared workload of issue 20 (before 4 in a run), through the whole stack on this model:
   `openrl up` with a trainer and a transformers sampler on the GPU, bench/jobs.py's toy RL
   jobs (4 prompts x 4 samples x 8 tokens, a 200 ms reward per group, importance_sampling),
   1 job then --jobs (8) at once: RL steps/s and the ratio (target >= 5), each job step's
   split (save, sampling + reward, training) and CPU-seconds per process per RL step; then the
   weight sync, save -> the first token sampled with the new weights, p50 (target <= 50 ms).

6. LoRA slots in the sampler's forward, in process: rows of --tenants adapters (16 each, and 8
   base rows) grouped by slot against the module's own choice (the dense route, on a GPU, for a
   decode step), for a decode step and a 16-position prefill; ms each, the ratio, the largest
   logit difference.

`--parts` picks what runs (stack, bare, jobs, tenants, slots; all by default): `--parts
jobs,tenants,slots` is issue 20's part alone.

    bash bench/gpu_check.sh                 # on the GPU machine: installs the carried wheels, then this
    python bench/gpu_check.py --tiny        # a small Qwen3 on CPU, a few tokens: checks the script end to end
    python bench/gpu_check.py --tiny --dtype bfloat16 --parts bare,tenants,slots   # ... in the GPU's dtype

Prints the figures and writes them as JSON (--out), also when a phase fails (with "error").
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from common import API_KEY, fb_message, finish_results, stack_processes, start_stack, stop_stack

ROOT = Path(__file__).resolve().parent.parent

QWEN3_8B = dict(
    vocab_size=151_936, hidden_size=4096, intermediate_size=12_288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960, tie_word_embeddings=False,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6,
)  # fmt: skip
TINY = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip
# bf16 dense peak FLOP/s, by a piece of torch.cuda.get_device_name(); the first match wins.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12))
LORA_RANK = 32
PARTS = ("stack", "bare", "jobs", "tenants", "slots")  # what a run does, in this order (--parts)
LEARNING_RATE = 1e-5


def peak_flops(device_name: str | None) -> float | None:
    return next((flops for key, flops in PEAK_BF16 if device_name and key in device_name), None)


def build_and_save(config: dict, device: str, dtype, path: Path) -> dict:
    """Random init straight on `device` (every parameter is created there, so no 16 GB copy),
    then save_pretrained; returns the parameter count and the seconds each took."""
    import torch
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401  imported here, not inside the timing
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**config), dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.save_pretrained(path)
    t2 = time.perf_counter()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"params": params, "init_s": round(t1 - t0, 1), "save_s": round(t2 - t1, 1)}


def make_batches(vocab: int, n: int, batch: int, length: int) -> list[dict[str, np.ndarray]]:
    """RL batches as the cookbook sends them: tokens (B, L+1) whose shifted part is the targets,
    sampler logprobs near a random-init model's own (-log vocab, so ratios stay near 1) and
    one advantage per sequence."""
    rng = np.random.default_rng(0)
    return [
        {
            "tokens_B_T": rng.integers(0, vocab, (batch, length + 1)),
            "logprobs_B_L": (-math.log(vocab) + rng.normal(0, 0.1, (batch, length))).astype(np.float32),
            "advantages_B_L": np.repeat(rng.normal(0, 1, (batch, 1)), length, axis=1).astype(np.float32),
        }
        for _ in range(n)
    ]


class GpuMemoryWatch:
    """The device's used memory (all processes, cudaMemGetInfo), polled in a thread: the peak
    above what was in use when the watch started."""

    def __init__(self, interval_s: float = 0.05):
        import torch

        self._torch, self._interval = torch, interval_s
        self.baseline = self._used()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _used(self) -> int:
        free, total = self._torch.cuda.mem_get_info()
        return total - free

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._used())

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_gb": round((self.peak - self.baseline) / 1e9, 2), "device_baseline_gb": round(self.baseline / 1e9, 2)}


def timed_steps(step, n: int, warmup: int) -> tuple[list[float], list[float]]:
    """Run step(i) for warmup + n batches; (timed seconds, every step's loss)."""
    times, losses = [], []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        losses.append(step(i))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, losses


def run_stack(path: Path, batches: list[dict], args, device: str) -> dict:
    import tinker

    with tempfile.TemporaryDirectory(prefix="openrl-gpu-check-") as tmp:
        t0 = time.perf_counter()
        watch = GpuMemoryWatch() if device == "cuda" else None
        up_args = ["--base-model", str(path), "--samplers", "0"] + (["--threads", str(args.threads)] if args.threads else [])
        proc, url = start_stack(Path(tmp), *up_args)
        ready_s = time.perf_counter() - t0
        print(f"stack up in {ready_s:.1f} s (the trainer loads {path})", flush=True)
        try:
            service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
            tc = service.create_lora_training_client(base_model=str(path), rank=LORA_RANK, seed=0).result()
            adam = tinker.types.AdamParams(learning_rate=LEARNING_RATE)
            D = tinker.types.TensorData.from_numpy
            datums = [
                [
                    tinker.types.Datum(
                        model_input=tinker.types.ModelInput.from_ints(tokens[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": D(tokens[1:].astype(np.int64)), "logprobs": D(q), "advantages": D(a)},
                    )
                    for tokens, q, a in zip(b["tokens_B_T"], b["logprobs_B_L"], b["advantages_B_L"])
                ]
                for b in batches
            ]

            def step(i: int) -> float:
                fb = tc.forward_backward(datums[i], loss_fn="importance_sampling")
                opt = tc.optim_step(adam)
                loss = fb.result().metrics["loss:sum"]
                opt.result()
                return loss

            times, losses = timed_steps(step, args.steps, args.warmup)
        finally:
            stop_stack(proc)
            memory = watch.stop() if watch else None
    return {"ready_s": round(ready_s, 1), "times_s": [round(t, 3) for t in times], "losses": losses, "gpu_memory": memory}


def run_bare(path: Path, batches: list[dict], args, device: str, dtype) -> dict:
    """Plain transformers + peft + torch on the same batches: no service, no micro-batching
    logic beyond a loop over slices, full-vocabulary logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from openrl.bus.messages import LORA_ALPHA
    from openrl.trainer.engine import TARGETS

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.requires_grad_(False)
    load_s = time.perf_counter() - t0
    checkpointing = device == "cuda" if args.bare_checkpointing is None else args.bare_checkpointing
    targets = [name for names in TARGETS.values() for name in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames gradient -> activation checkpointing
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets))
    model.train(checkpointing)  # transformers checkpoints a layer only in training mode; Qwen3 has no dropout
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-12,
        weight_decay=0.0, fused=device == "cuda" or None,
    )  # fmt: skip
    rows = max(1, args.bare_microbatch_tokens // args.length)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> float:
        b = {k: torch.from_numpy(v).to(device) for k, v in batches[i].items()}
        total = 0.0
        for s in range(0, len(b["tokens_B_T"]), rows):
            ids_B_T = b["tokens_B_T"][s : s + rows]
            logits_B_L_V = model(input_ids=ids_B_T[:, :-1], use_cache=False).logits
            lp_B_L = torch.log_softmax(logits_B_L_V.float(), -1).gather(-1, ids_B_T[:, 1:, None]).squeeze(-1)
            del logits_B_L_V
            loss = -(torch.exp(lp_B_L - b["logprobs_B_L"][s : s + rows]) * b["advantages_B_L"][s : s + rows]).sum()
            loss.backward()
            _ = lp_B_L.detach().cpu().numpy()  # the logprobs a client gets back
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    times, losses = timed_steps(step, args.steps, args.warmup)
    out = {"load_s": round(load_s, 1), "times_s": [round(t, 3) for t in times], "losses": losses,
           "microbatch_tokens": rows * args.length, "activation_checkpointing": checkpointing}  # fmt: skip
    if device == "cuda":
        out["gpu_memory"] = {
            "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
        }
    del model, opt
    return out


def run_tenants(path: Path, args, device: str, dtype) -> dict:
    """8 tenants' forward_backward requests in one shared call vs one tenant at a time, on the
    trainer's engine with activation checkpointing on (the CUDA default, forced on --tiny too so
    that the CPU dry run takes the same path)."""
    import torch

    from openrl.bus.messages import LoraSpec
    from openrl.trainer.engine import LoraEngine

    t0 = time.perf_counter()
    engine = LoraEngine(str(path), device=device, dtype=dtype, activation_checkpointing=True)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    vocab = engine.info.vocab_size
    reqs = []
    for t in range(args.tenants):
        engine.create(f"tenant-{t}", LoraSpec(rank=LORA_RANK, seed=t))
        reqs.append(fb_message(f"tenant-{t}", rng.integers(0, vocab, (4, args.tenant_length + 1))))

    def timed(call) -> tuple[float, list]:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = call()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    def shared_call(dense: bool):
        engine.dense_shared_passes = dense  # LoraSlots.dense_segments: one pass per layer for all tenants
        try:
            return engine.forward_backward_many(reqs)
        finally:
            engine.dense_shared_passes = None

    shared_s, dense_s, alone_s, lp_diff, loss_diff, dense_lp_diff = [], [], [], 0.0, 0.0, 0.0
    for rep in range(args.warmup + args.steps):
        s, shared = timed(lambda: shared_call(False))
        d, dense = timed(lambda: shared_call(True))
        a, alone = timed(lambda: [engine.forward_backward(r) for r in reqs])
        for got, also, want in zip(shared, dense, alone, strict=True):
            if any(isinstance(x, Exception) for x in (got, also, want)):
                raise RuntimeError(f"a tenant's request failed: shared {got!r}, dense {also!r}, alone {want!r}")
        if rep == 0:  # the same weights every way (no optim_step here)
            lp_diff = max(float(np.abs(x - y).max()) for g, w in zip(shared, alone) for x, y in zip(g.logprobs, w.logprobs))
            dense_lp_diff = max(float(np.abs(x - y).max()) for g, w in zip(dense, alone) for x, y in zip(g.logprobs, w.logprobs))
            loss_diff = max(abs(g.metrics["loss:sum"] - w.metrics["loss:sum"]) / max(abs(w.metrics["loss:sum"]), 1e-9)
                            for g, w in zip(shared, alone))  # fmt: skip
        if rep >= args.warmup:
            shared_s.append(s)
            dense_s.append(d)
            alone_s.append(a)
    tokens = args.tenants * 4 * args.tenant_length
    out = {
        "load_s": round(load_s, 1), "tenants": args.tenants, "sequences_per_tenant": 4, "tokens_per_sequence": args.tenant_length,
        "activation_checkpointing": engine.checkpointing, "microbatch_tokens": engine.microbatch_tokens,
        "shared_times_s": [round(t, 3) for t in shared_s], "alone_times_s": [round(t, 3) for t in alone_s],
        "shared_tokens_per_s": round(tokens / float(np.median(shared_s)), 1),
        "alone_tokens_per_s": round(tokens / float(np.median(alone_s)), 1),
        "shared_over_alone": round(float(np.median(alone_s)) / float(np.median(shared_s)), 3),
        "max_logprob_diff": lp_diff, "max_loss_rel_diff": loss_diff,
        "dense_times_s": [round(t, 3) for t in dense_s],
        "dense_tokens_per_s": round(tokens / float(np.median(dense_s)), 1),
        "dense_over_alone": round(float(np.median(alone_s)) / float(np.median(dense_s)), 3),
        "dense_max_logprob_diff": dense_lp_diff,
    }  # fmt: skip
    if device == "cuda":
        out["gpu_memory"] = {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
    del engine
    return out


def run_jobs(path: Path, args, device: str, vocab: int) -> dict:
    """Issue 20's shared workload on this model through the whole stack (`openrl up` with a
    trainer and a transformers sampler, both on this device): bench/jobs.py's toy RL jobs (rank
    8; 4 prompts x 4 samples x 8 tokens, a 200 ms reward per group, importance_sampling), 1 job
    then --jobs at once, --job-steps each; RL steps/s, the ratio, each job step's split and
    CPU-seconds per process per RL step; then the weight sync (save -> the first token sampled
    with the new weights) --sync-n times."""
    from jobs import phase, weight_sync

    base = str(path)
    with tempfile.TemporaryDirectory(prefix="openrl-gpu-jobs-") as tmp:
        t0 = time.perf_counter()
        watch = GpuMemoryWatch() if device == "cuda" else None
        proc, url = start_stack(Path(tmp), "--base-model", base, *(["--threads", str(args.threads)] if args.threads else []))
        ready_s = time.perf_counter() - t0
        print(f"stack with a sampler up in {ready_s:.1f} s", flush=True)
        try:
            procs = stack_processes(proc.pid)
            out: dict = {"ready_s": round(ready_s, 1), "processes": sorted(procs.values())}
            asyncio.run(phase(url, base, 1, 2, procs, vocab, 500))  # warm-up: code paths, CUDA kernels, adapters
            for jobs in (1, args.jobs):
                out[f"jobs_{jobs}"] = row = asyncio.run(phase(url, base, jobs, args.job_steps, procs, vocab, 100 * jobs))
                print(f"shared workload, {jobs} job(s): {row['steps_per_s']} RL steps/s; a job's step p50 ms "
                      f"{row['step_p50_ms']}; CPU-s per RL step {row['cpu_s_per_step']}", flush=True)  # fmt: skip
            out["ratio"] = round(out[f"jobs_{args.jobs}"]["steps_per_s"] / out["jobs_1"]["steps_per_s"], 3)
            out["weight_sync"] = sync = asyncio.run(weight_sync({"this": url}, base, args.sync_n))["this"]
            print(f"shared workload: {args.jobs} jobs / 1 job = {out['ratio']} (target >= 5); weight sync p50 "
                  f"{sync['p50_ms']} ms (save {sync['save_p50_ms']}, sample {sync['sample_p50_ms']}; target <= 50)", flush=True)  # fmt: skip
        finally:
            stop_stack(proc)
            out["gpu_memory"] = watch.stop() if watch else None
    return out


def run_slots(path: Path, args, device: str, dtype) -> dict:
    """The sampler's forward over rows of --tenants adapters on LoRA slots (openrl/lora_slots.py),
    in process: grouped by slot (6 ops per slot present in each layer) against the module's own
    choice (on a GPU, the dense route for a decode step, 4 ops a layer, and the dense form of a
    shared pass for a prefill), alternating; for a decode
    step (one position per row) and a prefill of 16 positions. Rank 32 on the attention and MLP
    projections, 16 rows per tenant and 8 base rows, interleaved."""
    import torch
    from transformers import AutoModelForCausalLM

    from openrl.lora_slots import BASE, PREFIX, LoraSlots

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval().requires_grad_(False)
    load_s = time.perf_counter() - t0
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    slots = LoraSlots(model, num_slots=args.tenants, rank=LORA_RANK)
    g = torch.Generator(device=device).manual_seed(0)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    for t in range(args.tenants):
        state = {}
        for name, m in linears:
            # Sized so each adapter moves the logits visibly (checked below), not only in rounding.
            state[f"{PREFIX}{name}.lora_A.weight"] = torch.randn((LORA_RANK, m.in_features), generator=g, device=device, dtype=dtype) / m.in_features**0.5
            state[f"{PREFIX}{name}.lora_B.weight"] = torch.randn((m.out_features, LORA_RANK), generator=g, device=device, dtype=dtype) * 0.02
        slots.load(t, slots.check(state, LORA_RANK), rank=LORA_RANK, alpha=LORA_RANK)
        del state
    rows = [t for t in range(args.tenants) for _ in range(16)] + [BASE] * 8
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1)).tolist()
    rows = [rows[i] for i in order]
    vocab = model.config.vocab_size

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    out: dict = {"load_s": round(load_s, 1), "tenants": args.tenants, "rows": len(rows), "lora_layers": len(slots.layers),
                 "dense_max_work": slots.dense_max_work}  # fmt: skip
    for phase, width in (("decode", 1), ("prefill", 16)):
        ids = torch.randint(0, vocab, (len(rows), width), generator=torch.Generator().manual_seed(2)).to(device)

        def forward(dense: bool):
            slots.set_form("auto" if dense else "grouped")  # grouped: neither dense form, decode or prefill
            with torch.no_grad(), slots.route(rows):
                logits = model(input_ids=ids, logits_to_keep=1).logits
            slots.set_form("auto")
            return logits

        times: dict[str, list[float]] = {"grouped": [], "auto": []}
        dense_logits = forward(True).float()
        diff = float((dense_logits - forward(False).float()).abs().max())
        with torch.no_grad():
            effect = float((dense_logits - model(input_ids=ids, logits_to_keep=1).logits.float()).abs().max())  # no route: the base
        for rep in range(args.warmup + args.steps + 2):
            for case in times:
                sync()
                t = time.perf_counter()
                forward(case == "auto")
                sync()
                if rep >= args.warmup:
                    times[case].append(time.perf_counter() - t)
        med = {case: float(np.median(ts)) for case, ts in times.items()}
        out[phase] = {"grouped_ms": round(med["grouped"] * 1000, 2), "auto_ms": round(med["auto"] * 1000, 2),
                      "grouped_over_auto": round(med["grouped"] / med["auto"], 3), "max_logit_diff": diff,
                      "max_adapter_effect": effect}  # fmt: skip
        print(f"LoRA slots, {phase} ({len(rows)} rows of {args.tenants} tenants, {width} position(s)): grouped "
              f"{out[phase]['grouped_ms']} ms, auto {out[phase]['auto_ms']} ms = {out[phase]['grouped_over_auto']}x; "
              f"max logit diff {diff:.3g} (the adapters move them by up to {effect:.3g})", flush=True)  # fmt: skip
    del model, slots
    return out


def summarize(side: dict, tokens: int, params: int, peak: float | None) -> None:
    med = float(np.median(side["times_s"]))
    side["step_s_median"] = round(med, 3)
    side["tokens_per_s"] = round(tokens / med, 1)
    side["mfu"] = round(6 * params * tokens / med / peak, 4) if peak else None  # 6 x parameters x tokens/s / peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("OPENRL_GPU_CHECK_TINY") == "1",
                   help="a small Qwen3 on CPU and a few tokens, to check the script [OPENRL_GPU_CHECK_TINY=1]")
    p.add_argument("--batch", type=int, help="sequences per step (64; --tiny: 4)")
    p.add_argument("--length", type=int, help="tokens per sequence (1024; --tiny: 128)")
    p.add_argument("--steps", type=int, help="timed steps per side (4; --tiny: 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bare-microbatch-tokens", type=int, default=4096,
                   help="tokens per forward in the bare loop (its logits are whole: 4096 x 151936 fp32 is 2.5 GB)")
    p.add_argument("--bare-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing in the bare loop (default: as the trainer, on on CUDA)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"which parts to run, in this order: {','.join(PARTS)} (all; e.g. --parts jobs,tenants for issue 20's)")
    p.add_argument("--tenants", type=int, default=8, help="tenants in the tenant-batching part (0: skip it)")
    p.add_argument("--jobs", type=int, default=8, help="concurrent RL jobs in the shared-workload part (its other phase is 1 job)")
    p.add_argument("--job-steps", type=int, help="RL steps per job in each shared-workload phase (6; --tiny: 2)")
    p.add_argument("--sync-n", type=int, help="weight-sync measurements in the shared-workload part (10; --tiny: 3)")
    p.add_argument("--tenant-length", type=int, help="tokens per sequence in the tenant-batching part (256; --tiny: 32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the trainer (0: openrl up's choice)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="the model's dtype in the bare, tenants and slots parts, which run in this process (default: "
                        "bfloat16 on CUDA, float32 on CPU, as the trainer's engine picks; the stack's processes always "
                        "pick theirs). --tiny --dtype bfloat16 checks the GPU's dtype path on CPU")
    p.add_argument("--model-dir", default=None, help="where to save the random model (default: a temp dir, removed after)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    args = p.parse_args()
    args.batch = args.batch or (4 if args.tiny else 64)
    args.length = args.length or (128 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 4)
    args.tenant_length = args.tenant_length or (32 if args.tiny else 256)
    args.job_steps = args.job_steps or (2 if args.tiny else 6)
    args.sync_n = args.sync_n or (3 if args.tiny else 10)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--parts: choose among {','.join(PARTS)}, got {args.parts!r}")
    if "jobs" in parts and args.jobs < 2:
        p.error("--jobs must be >= 2 (the shared workload compares it with 1 job)")
    if args.tiny:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every process, the stack's trainer too, on CPU

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    import torch
    from transformers.utils import logging as hf_logging

    from openrl.base_model import default_dtype

    hf_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.tiny:
        sys.exit("gpu_check: no CUDA device; pass --tiny to check the script on CPU")
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)  # what the engines pick
    config = TINY if args.tiny else QWEN3_8B
    name = torch.cuda.get_device_name() if device == "cuda" else None
    peak = peak_flops(name)
    tokens = args.batch * args.length
    results: dict = {
        "machine": {"device": device, "gpu": name, "peak_bf16_flops": peak, "cpus": len(os.sched_getaffinity(0)),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__},
        "model": {"config": config, "dtype": str(dtype).removeprefix("torch."), "lora_rank": LORA_RANK},
        "batch": {"sequences": args.batch, "length": args.length, "tokens": tokens, "loss_fn": "importance_sampling"},
    }  # fmt: skip
    if peak is None and device == "cuda":
        print(f"no bf16 peak known for {name!r}: MFU is not computed (add it to PEAK_BF16)", flush=True)
    started = time.perf_counter()
    model_dir = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="openrl-gpu-model-"))
    try:
        built = build_and_save(config, device, dtype, model_dir)
        results["model"].update(built)
        params = built["params"]
        print(f"random Qwen3 ({params / 1e9:.2f}B parameters, {results['model']['dtype']}) built on {device} "
              f"in {built['init_s']} s, saved in {built['save_s']} s", flush=True)  # fmt: skip
        batches = make_batches(config["vocab_size"], args.warmup + args.steps, args.batch, args.length)

        if "stack" in parts:
            results["stack"] = stack = run_stack(model_dir, batches, args, device)
            summarize(stack, tokens, params, peak)
            mem = stack["gpu_memory"]
            print(f"stack: {stack['tokens_per_s']} tokens/s (step {stack['step_s_median']} s), MFU {stack['mfu']}, "
                  f"peak GPU memory {mem and mem['peak_gb']} GB", flush=True)  # fmt: skip

        if "bare" in parts:
            results["bare"] = bare = run_bare(model_dir, batches, args, device, dtype)
            summarize(bare, tokens, params, peak)
            mem = bare.get("gpu_memory")
            print(f"bare torch + peft: {bare['tokens_per_s']} tokens/s (step {bare['step_s_median']} s), MFU {bare['mfu']}, "
                  f"peak GPU memory {mem and mem['peak_allocated_gb']} GB allocated", flush=True)  # fmt: skip

        if "stack" in parts and "bare" in parts:
            results["ratio"] = round(bare["step_s_median"] / stack["step_s_median"], 3)
            s0, b0 = stack["losses"][0], bare["losses"][0]
            results["step0_loss"] = {"stack": s0, "bare": b0, "rel_diff": round(abs(s0 - b0) / max(abs(b0), 1e-9), 5)}
            print(f"stack / bare = {results['ratio']} (target >= 0.90); step-0 loss stack {s0:.4g}, bare {b0:.4g}", flush=True)

        if "jobs" in parts:
            if device == "cuda":
                torch.cuda.empty_cache()
            results["jobs"] = run_jobs(model_dir, args, device, config["vocab_size"])

        if "tenants" in parts and args.tenants:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            results["tenants"] = ten = run_tenants(model_dir, args, device, dtype)
            print(f"tenant batching ({args.tenants} tenants x 4 x {args.tenant_length} tokens, checkpointing "
                  f"{ten['activation_checkpointing']}): shared {ten['shared_tokens_per_s']} vs alone "
                  f"{ten['alone_tokens_per_s']} tokens/s = {ten['shared_over_alone']}x (target >= 1.5); "
                  f"max logprob diff {ten['max_logprob_diff']:.3g}; the dense form of the shared call "
                  f"{ten['dense_tokens_per_s']} tokens/s = {ten['dense_over_alone']}x, max logprob diff "
                  f"{ten['dense_max_logprob_diff']:.3g}", flush=True)  # fmt: skip

        if "slots" in parts and args.tenants:
            if device == "cuda":
                torch.cuda.empty_cache()
            results["slots"] = run_slots(model_dir, args, device, dtype)
    except BaseException as e:
        results["error"] = "".join(traceback.format_exception(e))[-4000:]
        raise
    finally:
        if not args.model_dir:
            import shutil

            shutil.rmtree(model_dir, ignore_errors=True)
        finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()

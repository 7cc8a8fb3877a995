"""The prepared GPU check (bench/gpu_check.py) runs end to end: a GPU is lent rarely and for
minutes, so the one-shot script must not be found broken on it. Here with --tiny (a small
Qwen3 on CPU, every part: the stack, the bare loop, issue 20's shared workload through a stack
with a sampler, tenant batching, LoRA slots grouped vs dense), at the smallest sizes; about 45 s."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--steps", "1", "--job-steps", "1", "--jobs", "3",
         "--sync-n", "1", "--tenants", "3", "--tenant-length", "8", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "error" not in r
    # The stack and the bare loop computed the same step 0 (the LoRA starts at zero).
    assert r["step0_loss"]["rel_diff"] < 1e-4 and r["ratio"] > 0
    jobs = r["jobs"]
    assert jobs["jobs_1"]["rl_steps"] == 1 and jobs["jobs_3"]["rl_steps"] == 3
    for row in (jobs["jobs_1"], jobs["jobs_3"]):
        assert row["steps_per_s"] > 0
        assert {"trainer", "sampler", "gateway", "nats-server", "bench"} <= set(row["cpu_s_per_step"])
        assert row["cpu_s_per_step"]["trainer"] > 0 and row["cpu_s_per_step"]["sampler"] > 0
        assert all(v > 0 for v in row["step_p50_ms"].values())
    assert jobs["weight_sync"]["n"] == 1 and jobs["weight_sync"]["p50_ms"] > 0
    tenants = r["tenants"]
    assert tenants["tenants"] == 3 and tenants["activation_checkpointing"] is True
    assert tenants["max_logprob_diff"] < 1e-4 and tenants["max_loss_rel_diff"] < 1e-4
    assert tenants["dense_tokens_per_s"] > 0 and tenants["dense_max_logprob_diff"] < 1e-4
    slots = r["slots"]
    assert slots["tenants"] == 3 and slots["rows"] == 3 * 16 + 8
    for phase in ("decode", "prefill"):
        assert slots[phase]["grouped_ms"] > 0 and slots[phase]["auto_ms"] > 0
        assert slots[phase]["max_logit_diff"] < 1e-4 < 1e-2 < slots[phase]["max_adapter_effect"]


def test_the_gpu_check_runs_its_in_process_parts_in_the_gpus_dtype_on_cpu(tmp_path):
    """A GPU runs the engines in bfloat16, where the test above runs float32: the same in-process
    parts (the bare loop, tenant batching both forms, the LoRA slots) in bfloat16 on CPU."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--dtype", "bfloat16", "--parts", "bare,tenants,slots",
         "--steps", "1", "--tenants", "3", "--tenant-length", "8", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "error" not in r and r["model"]["dtype"] == "bfloat16"
    assert r["bare"]["tokens_per_s"] > 0 and all(math.isfinite(x) for x in r["bare"]["losses"])
    tenants = r["tenants"]
    assert tenants["max_logprob_diff"] < 0.05 and tenants["dense_max_logprob_diff"] < 0.05  # bf16: 8 significant bits
    assert tenants["max_loss_rel_diff"] < 0.01
    for phase in ("decode", "prefill"):
        assert r["slots"][phase]["max_logit_diff"] < 0.05 < r["slots"][phase]["max_adapter_effect"]


def test_the_gpu_check_refuses_an_unknown_part(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--parts", "stack,nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--parts" in proc.stderr and "nope" in proc.stderr

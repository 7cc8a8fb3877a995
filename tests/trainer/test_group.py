"""A 2-rank trainer group (FSDP2 over gloo on CPU, launched by torchrun) gives the numbers of a
single trainer for the same requests, and checkpoints move between world sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from openrl.bus.messages import AdamParams, ForwardBackward, LoraSpec
from openrl.trainer import group as groups
from openrl.trainer.engine import LoraEngine

from factories import random_request
from group_script import CHUNK_BYTES, run_steps

SCRIPT = Path(__file__).with_name("group_script.py")
# Budget 24: five datums make three micro-batches ([23], [17], [9, 6]), so rank 1 runs one
# real pass and one zero-weight pass while rank 0 runs two real ones.
LENGTHS = (9, 23, 6, 17, 4)
BUDGET = 24
ADAM = AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-4, weight_decay=0.1, grad_clip_norm=0.5)
CREATES = [("a", LoraSpec(rank=8, seed=1)), ("b", LoraSpec(rank=4, seed=2, train_unembed=True))]


def steps() -> list:
    def fb(model_id, loss_fn, seed, **kw) -> ForwardBackward:
        return random_request(loss_fn, seed, LENGTHS, model_id=model_id, **kw)

    return [
        fb("a", "ppo", 0),
        ("a", ADAM),
        fb("b", "cross_entropy", 1),
        fb("a", "gspo", 2, forward_only=True),
        fb("b", "importance_sampling", 3),
        ("b", ADAM),
        fb("a", "cispo", 4),
        ("a", ADAM),
        fb("a", "dro", 5, forward_only=True),
    ]


def run_group(tmp_path: Path, model_path: str, state: bytes = b"", tag: str = "g") -> dict:
    script = msgspec.msgpack.encode({"creates": CREATES, "steps": steps(), "microbatch_tokens": BUDGET, "state": state})
    (tmp_path / f"{tag}.msgpack").write_bytes(script)
    out = tmp_path / f"{tag}.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", str(SCRIPT),
           model_path, str(tmp_path / f"{tag}.msgpack"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


def run_single(model_path: str, state: bytes = b"") -> tuple[dict, LoraEngine]:
    engine = LoraEngine(model_path, device="cpu", microbatch_tokens=BUDGET, logits_chunk_bytes=CHUNK_BYTES)
    return run_steps(engine, CREATES, steps(), state), engine


def assert_same_results(group: dict, single: dict) -> None:
    assert group.keys() == single.keys()
    for key, want in single.items():
        got = group[key]
        if key.startswith("w."):  # weights after AdamW: see test_microbatch.py on its noise
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=key)
        elif ".loss" in key:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * sum(LENGTHS), err_msg=key)
        else:  # logprobs, grad norms
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.timeout(600)
def test_two_ranks_equal_one_and_checkpoints_cross_world_sizes(tmp_path, qwen3_path):
    group = run_group(tmp_path, qwen3_path)
    single, engine = run_single(qwen3_path)
    assert_same_results(group, single)
    assert any(k.endswith(".lp.4") for k in group)  # the short datums came back from rank 1 too

    # Saved by the 2-rank group, loaded by a single trainer: the same weights and optimizer.
    state = (tmp_path / "g.npz.a.state").read_bytes()
    one = LoraEngine(qwen3_path, device="cpu")
    one.create("a", CREATES[0][1])
    one.import_state("a", load(state), groups.safetensors_metadata(state), with_optimizer=True)
    for name, t in one.adapter_state("a").items():
        torch.testing.assert_close(t, torch.from_numpy(group[f"w.a.{name}"]))
    tensors, metadata = engine.export_state("a", with_optimizer=True)
    exported = load(state)
    for name, t in tensors.items():
        torch.testing.assert_close(exported[name], t, rtol=1e-4, atol=1e-4 * max(1e-3, t.abs().max().item()))

    # Saved by a single trainer, loaded by the group (rank 0 checks it, every rank loads it).
    single_state = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    resumed = run_group(tmp_path, qwen3_path, state=single_state, tag="resumed")
    want, _ = run_single(qwen3_path, state=single_state)
    assert_same_results(resumed, want)


def test_group_settings_that_cannot_start_are_refused():
    cases = {
        "--nproc-per-node must be >= 1": groups.GroupConfig(nproc_per_node=0),
        "--node-rank must be in [0, 2)": groups.GroupConfig(nnodes=2, node_rank=2, master_addr="h"),
        "--master-addr (node 0's address) is required": groups.GroupConfig(nnodes=2),
        "--master-port must be in": groups.GroupConfig(master_port=70000),
        "more ranks than the 1 CUDA device": groups.GroupConfig(nproc_per_node=2),
    }
    for message, cfg in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            cfg.check(cuda_devices=1)
    groups.GroupConfig(nproc_per_node=2).check(cuda_devices=None)  # CPU ranks: no device limit


def test_a_rank_that_aborts_in_the_backend_prints_its_python_stack(tmp_path):
    """An abort inside C++ (gloo, nccl: std::terminate) kills a rank with no Python traceback;
    a rank that joined its group prints every thread's Python stack first (faulthandler)."""
    script = tmp_path / "aborting_rank.py"
    script.write_text(
        "import os\n"
        "from openrl.trainer import group\n"
        "group.init_rank(group.GroupConfig(collective_timeout_s=30), 'cpu')\n"
        "def the_call_it_was_in():\n"
        "    os.abort()\n"
        "the_call_it_was_in()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--standalone", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "Fatal Python error: Aborted" in proc.stderr and "in the_call_it_was_in" in proc.stderr, proc.stderr[-3000:]


def test_a_node_that_cannot_reach_its_rendezvous_fails_with_a_clear_error(tmp_path):
    """Node 1 of 2 whose master never answers: the launcher gives up after the rendezvous
    timeout and exits non-zero, saying why; it never hangs."""
    from openrl.bus.server import free_port

    port = free_port()  # nobody listens there
    cmd = [sys.executable, "-m", "openrl", "trainer", "--nats-url", "nats://127.0.0.1:1", "--nnodes", "2", "--node-rank", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "--rendezvous-timeout-s", "3", "--log-format", "json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"node 1 of 2 could not reach the group's rendezvous at 127.0.0.1:{port} within 3 s" in proc.stderr + proc.stdout


REFUSE = """
import contextlib, io, json, sys
from openrl.cli import main
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(["trainer", *args])
            code = 0
        except SystemExit as e:
            code = e.code
    out.append([code, str(code) + err.getvalue()])
print(json.dumps(out))
"""


def test_impossible_group_settings_are_refused_at_start():
    """Each refused before anything starts, with its message (one Python process runs the CLI for
    every case, as `openrl trainer ...` would: eight processes importing torch took 30 s)."""
    cases = (
        (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1"),
        (["--nnodes", "2"], "--master-addr (node 0's address) is required"),
        (["--microbatch-tokens", "-1"], "--microbatch-tokens must be >= 1"),
        (["--microbatch-tokens", "0"], "--microbatch-tokens must be >= 1"),
        (["--preempt-slice-ms", "-5"], "--preempt-slice-ms must be a finite number >= 0"),
        (["--preempt-slice-ms", "nan"], "--preempt-slice-ms must be a finite number >= 0"),
        (["--preempt-slice-ms", "50", "--device", "cuda"], "--preempt-slice-ms is for the CPU only"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--nproc-per-node", "999"], "CUDA"),
    )
    proc = subprocess.run([sys.executable, "-c", REFUSE, json.dumps([args for args, _ in cases])],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (args, message), (code, said) in zip(cases, json.loads(proc.stdout.splitlines()[-1]), strict=True):
        assert code not in (0, None) and message in said, (args, said[-2000:])
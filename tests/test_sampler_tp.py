"""Tensor-parallel vLLM samplers: `openrl up --sampler-gpus ... --sampler-tensor-parallel-size N`
gives each sampler N GPUs and `openrl sampler --tensor-parallel-size N` (openrl/placement.py,
openrl/cli.py). The plumbing is pure, so it is tested without GPUs: what `place` hands each
sampler, parsed by the real `openrl sampler` parser, and the refusals, from the real entry points."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from openrl import cli
from openrl.placement import ALONE_BUDGET, place
from openrl.sampler.vllm_backend import LORA_RANKS, check_engine_args


def gpus(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def up(**kw):
    kw.setdefault("trainers", 1)
    kw.setdefault("samplers", 1)
    kw.setdefault("trainer_nproc", None)
    kw.setdefault("trainer_gpus", "")
    kw.setdefault("sampler_gpus", "")
    return place(**kw)


def sampler_args(slot):
    return cli.parser().parse_args(["sampler", *slot.args])


@pytest.fixture
def clean_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("OPENRL_")]:
        monkeypatch.delenv(k)


def test_each_sampler_gets_a_group_of_n_gpus_in_order(clean_env):
    p = up(samplers=2, trainer_gpus="4", sampler_gpus="3,2,1,0", sampler_tp=2, visible=gpus(5))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in p.samplers] == ["3,2", "1,0"]
    for slot in p.samplers:
        args = sampler_args(slot)
        assert (args.tensor_parallel_size, args.gpu_memory_fraction) == (2, None)  # alone on its GPUs: no cap


def test_groups_go_round_robin_and_samplers_sharing_a_group_split_it(clean_env):
    p = up(samplers=3, trainer_gpus="4", sampler_gpus="0,1,2,3", sampler_tp=2, visible=gpus(5))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in p.samplers] == ["0,1", "2,3", "0,1"]
    half = ALONE_BUDGET / 2
    assert [sampler_args(s).gpu_memory_fraction for s in p.samplers] == [half, None, half]
    # Without --trainer-gpus the trainer is on GPU 0 (placement.py): a group with GPU 0 is shared with it.
    p = up(samplers=2, sampler_gpus="0,1,2,3", sampler_tp=2, visible=gpus(4))
    assert [sampler_args(s).gpu_memory_fraction for s in p.samplers] == [0.3, None]
    assert {sampler_args(s).tensor_parallel_size for s in p.samplers} == {2}


def test_a_group_that_includes_a_trainer_gpu_gets_the_shared_fraction(clean_env):
    p = up(trainer_gpus="0", sampler_gpus="0,1", sampler_tp=2, shared_fraction=0.4, visible=gpus(2))
    [slot] = p.samplers
    assert slot.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert (sampler_args(slot).gpu_memory_fraction, sampler_args(slot).tensor_parallel_size) == (0.4, 2)


def test_tensor_parallel_size_1_changes_nothing(clean_env):
    for kw in (dict(sampler_gpus="0,1", samplers=2, visible=gpus(2)), dict(trainer_gpus="0", sampler_gpus="0", visible=gpus(1))):
        assert up(**kw) == up(**kw, sampler_tp=1)
        assert all("--tensor-parallel-size" not in s.args for s in up(**kw).samplers)
    assert sampler_args(up().samplers[0]).tensor_parallel_size == 1


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(sampler_tp=0), "--sampler-tensor-parallel-size must be >= 1"),
        (dict(sampler_tp=2), "--sampler-tensor-parallel-size 2 needs --sampler-gpus"),
        (dict(sampler_gpus="0,1,2", sampler_tp=2, samplers=2, visible=gpus(3)), "do not split into groups of --sampler-tensor-parallel-size 2"),
        (dict(sampler_gpus="0,1,2,3", sampler_tp=2, samplers=1, visible=gpus(4)), "2 groups of 2 GPUs for 1 samplers, leaving GPU 2 unused"),
        (dict(sampler_gpus="0,1", sampler_tp=2, visible=gpus(1)), "there is no GPU 1"),
    ],
)
def test_impossible_tensor_parallel_placements_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        up(**kw)


def test_up_reads_the_flags_and_env(clean_env, monkeypatch):
    args = cli.parser().parse_args(["up"])
    assert (args.sampler_tensor_parallel_size, args.sampler_backend, args.sampler_python) == (1, "transformers", "")
    monkeypatch.setenv("OPENRL_SAMPLER_TENSOR_PARALLEL_SIZE", "4")
    monkeypatch.setenv("OPENRL_SAMPLER_BACKEND", "vllm")
    monkeypatch.setenv("OPENRL_SAMPLER_PYTHON", "/opt/vllm/bin/python")
    args = cli.parser().parse_args(["up"])
    assert (args.sampler_tensor_parallel_size, args.sampler_backend, args.sampler_python) == (4, "vllm", "/opt/vllm/bin/python")
    # The samplers run under that python, with the backend passed on.
    argv = cli._sampler_python(args, ["/usr/bin/python3", "-m", "openrl", "sampler", "--backend", "vllm"])
    assert argv == ["/opt/vllm/bin/python", "-m", "openrl", "sampler", "--backend", "vllm"]
    assert cli._sampler_python(cli.parser().parse_args(["up", "--sampler-python", ""]), ["py", "-m"]) == ["py", "-m"]


def test_sampler_reads_the_vllm_engine_flags(clean_env, monkeypatch):
    args = cli.parser().parse_args(["sampler"])
    assert (args.tensor_parallel_size, args.kv_cache_gib, args.max_model_len, args.enforce_eager, args.max_adapters) == (1, None, 0, False, 32)
    for k, v in {"TENSOR_PARALLEL_SIZE": "2", "KV_CACHE_GIB": "0.5", "MAX_MODEL_LEN": "512", "ENFORCE_EAGER": "1", "MAX_ADAPTERS": "3"}.items():
        monkeypatch.setenv(f"OPENRL_{k}", v)
    args = cli.parser().parse_args(["sampler"])
    assert (args.tensor_parallel_size, args.kv_cache_gib, args.max_model_len, args.enforce_eager, args.max_adapters) == (2, 0.5, 512, True, 3)
    assert cli._gib_bytes(args.kv_cache_gib) == 1 << 29


def test_engine_args_vllm_would_refuse_are_refused_first():
    check_engine_args(max_lora_rank=64, tensor_parallel_size=2, kv_cache_memory_bytes=1 << 30, max_model_len=256)
    for rank in LORA_RANKS:
        check_engine_args(max_lora_rank=rank, tensor_parallel_size=1, kv_cache_memory_bytes=None, max_model_len=None)
    for kw, message in (
        (dict(max_lora_rank=4), "--max-lora-rank must be one of vLLM's ranks 1, 8, 16, 32, 64, 128, 256, 320, 512, got 4"),
        (dict(max_lora_rank=1024), "got 1024"),
        (dict(tensor_parallel_size=0), "--tensor-parallel-size must be >= 1"),
        (dict(kv_cache_memory_bytes=0), "--kv-cache-gib must be > 0"),
        (dict(max_model_len=1), "--max-model-len must be >= 2"),
        (dict(max_adapters=0), "--max-adapters must be >= 1"),
    ):
        args = dict(max_lora_rank=64, tensor_parallel_size=1, kv_cache_memory_bytes=None, max_model_len=None) | kw
        with pytest.raises(ValueError, match=message):
            check_engine_args(**args)


def run_openrl(*args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENRL_")}
    return subprocess.run([sys.executable, "-m", "openrl", *args], capture_output=True, text=True, timeout=120, env=clean)


def test_tensor_parallelism_without_vllm_is_refused_before_anything_starts(tmp_path):
    done = run_openrl("up", "--data-dir", str(tmp_path / "openrl"), "--sampler-tensor-parallel-size", "2")
    assert done.returncode != 0 and "--sampler-tensor-parallel-size 2 needs --sampler-backend vllm" in done.stderr, done.stderr
    assert not (tmp_path / "openrl").exists()
    done = run_openrl("sampler", "--nats-url", "nats://127.0.0.1:1", "--tensor-parallel-size", "2")
    assert done.returncode != 0 and "--tensor-parallel-size 2 needs --backend vllm" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr

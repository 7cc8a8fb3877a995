"""GPU placement for `openrl up` (openrl/placement.py): which GPUs each child sees, which
sampler gets a memory fraction, and which placements are refused, with what message.

`place` is pure (flags and visible GPUs in, env and args out), so it is tested without GPUs;
the real `openrl up` and `openrl sampler` entry points are run for the refusals, and what
`place` hands a child is parsed by the real `openrl trainer` / `openrl sampler` parsers."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from openrl import cli
from openrl.placement import ALONE_BUDGET, DEFAULT_SHARED_FRACTION, Slot, parse_gpus, place, visible_gpus


def gpus(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def devices(slots) -> list[str | None]:
    return [s.env.get("CUDA_VISIBLE_DEVICES") for s in slots]


def fractions(slots) -> list[float | None]:
    return [float(s.args[s.args.index("--gpu-memory-fraction") + 1]) if "--gpu-memory-fraction" in s.args else None for s in slots]


def up(**kw):
    kw.setdefault("trainers", 1)
    kw.setdefault("samplers", 1)
    kw.setdefault("trainer_nproc", None)
    kw.setdefault("trainer_gpus", "")
    kw.setdefault("sampler_gpus", "")
    return place(**kw)


# -- what children get ---------------------------------------------------------------------


def test_the_issues_example_one_trainer_group_on_two_gpus_and_a_sampler_on_the_third():
    p = up(trainer_gpus="0,1", sampler_gpus="2", visible=gpus(3))
    assert p.trainer_nproc == 2
    assert p.trainers == (Slot(env={"CUDA_VISIBLE_DEVICES": "0,1"}, args=("--nproc-per-node", "2")),)
    assert p.samplers == (Slot(env={"CUDA_VISIBLE_DEVICES": "2"}, args=()),)  # its own GPU: no cap


def test_trainer_gpus_split_in_order_into_groups_of_nproc():
    p = up(trainers=2, trainer_nproc=2, trainer_gpus="3,2,1,0", samplers=0, visible=gpus(4))
    assert devices(p.trainers) == ["3,2", "1,0"]  # in the order listed: rank K gets the K-th
    assert all(s.args == ("--nproc-per-node", "2") for s in p.trainers)
    p = up(trainers=3, trainer_nproc=1, trainer_gpus="0,1,2", samplers=0, visible=gpus(3))
    assert devices(p.trainers) == ["0", "1", "2"] and p.trainer_nproc == 1


def test_without_trainer_nproc_the_trainer_gpus_are_shared_out_evenly():
    p = up(trainers=2, trainer_gpus="0,1,2,3,4,5", samplers=0, visible=gpus(6))
    assert p.trainer_nproc == 3 and devices(p.trainers) == ["0,1,2", "3,4,5"]
    assert up(trainers=1, trainer_gpus="5", samplers=0, visible=gpus(6)).trainer_nproc == 1


def test_samplers_go_round_robin_and_samplers_sharing_a_gpu_split_it():
    p = up(samplers=5, trainer_gpus="0", sampler_gpus="1,2", visible=gpus(3))
    assert devices(p.samplers) == ["1", "2", "1", "2", "1"]
    # GPU 1: three samplers, no trainer: ALONE_BUDGET split three ways (rounded down); GPU 2: two.
    third, half = math.floor(ALONE_BUDGET / 3 * 1000) / 1000, ALONE_BUDGET / 2
    assert fractions(p.samplers) == [third, half, third, half, third]


def test_a_sampler_on_a_trainer_gpu_gets_the_shared_fraction():
    p = up(trainer_gpus="0", sampler_gpus="0", visible=gpus(1))
    assert devices(p.samplers) == ["0"] and fractions(p.samplers) == [DEFAULT_SHARED_FRACTION]
    assert p.samplers[0].args == ("--gpu-memory-fraction", "0.3")
    p = up(trainer_gpus="0,1", sampler_gpus="1", shared_fraction=0.5, visible=gpus(2))
    assert fractions(p.samplers) == [0.5]
    p = up(trainer_gpus="0,1", samplers=3, sampler_gpus="1,2", shared_fraction=0.5, visible=gpus(3))
    assert devices(p.samplers) == ["1", "2", "1"] and fractions(p.samplers) == [0.25, None, 0.25]


def test_shares_on_a_gpu_never_add_up_to_more_than_its_budget():
    for n, budget in itertools.product(range(1, 40), (0.3, 0.29, 0.7, 1.0, 0.123)):
        p = up(samplers=n, trainer_gpus="0", sampler_gpus="0", shared_fraction=budget, visible=gpus(1))
        (share,) = set(fractions(p.samplers))
        assert 0 < share * n <= budget + 1e-12, (n, budget, share)
        assert share * n > budget - n * 0.001, (n, budget, share)  # rounded by at most 0.001 each


def test_one_sampler_gets_exactly_the_fraction_asked_for():
    p = up(trainer_gpus="0", sampler_gpus="0", shared_fraction=0.0004, visible=gpus(1))
    assert fractions(p.samplers) == [0.0004]
    assert fractions(up(trainer_gpus="0", sampler_gpus="0", shared_fraction=1.0, visible=gpus(1)).samplers) == [1.0]


def test_with_only_trainer_gpus_the_samplers_stay_where_they_are_but_are_capped_on_a_trainer_gpu():
    # Unplaced samplers see every GPU and use the first: GPU 0, a trainer's here.
    p = up(samplers=2, trainer_gpus="0,1", visible=gpus(4))
    assert devices(p.samplers) == [None, None] and fractions(p.samplers) == [0.15, 0.15]
    # GPU 0 is nobody's trainer GPU: the two samplers only share it with each other.
    p = up(samplers=2, trainer_gpus="2,3", visible=gpus(4))
    assert fractions(p.samplers) == [ALONE_BUDGET / 2] * 2
    assert fractions(up(samplers=1, trainer_gpus="1", visible=gpus(2)).samplers) == [None]


def test_with_only_sampler_gpus_the_trainers_ranks_are_on_the_first_gpus():
    p = up(sampler_gpus="1", visible=gpus(2))
    assert devices(p.trainers) == [None] and fractions(p.samplers) == [None]
    p = up(trainer_nproc=2, sampler_gpus="1", visible=gpus(2))  # ranks on GPUs 0 and 1
    assert devices(p.trainers) == [None] and fractions(p.samplers) == [DEFAULT_SHARED_FRACTION]
    assert fractions(up(sampler_gpus="0", visible=gpus(2)).samplers) == [DEFAULT_SHARED_FRACTION]


def test_without_gpu_lists_nothing_is_placed_and_no_gpu_is_needed():
    p = up(trainers=2, samplers=3, trainer_nproc=4, visible=[])
    assert p.trainers == (Slot(args=("--nproc-per-node", "4")),) * 2
    assert p.samplers == (Slot(),) * 3
    assert up(visible=[]).trainers == (Slot(args=("--nproc-per-node", "1")),)


def test_children_name_the_gpus_as_the_parents_cuda_visible_devices_does():
    assert visible_gpus(3, None) == ["0", "1", "2"]
    assert visible_gpus(2, "4, 5") == ["4", "5"]
    assert visible_gpus(1, "7,99") == ["7"]  # CUDA stops at 99 (no such GPU): one visible
    assert visible_gpus(0, "") == []
    uuids = "GPU-0a1b2c3d-0000-0000-0000-000000000001,GPU-0a1b2c3d-0000-0000-0000-000000000002"
    assert visible_gpus(2, uuids) == uuids.split(",")
    p = up(trainer_gpus="1", sampler_gpus="0", visible=visible_gpus(2, "4,5"))
    assert devices(p.trainers) == ["5"] and devices(p.samplers) == ["4"]
    p = up(trainer_gpus="0,1", samplers=0, visible=visible_gpus(2, uuids))
    assert devices(p.trainers) == [uuids]


def test_what_a_child_gets_parses_with_the_real_worker_parsers(monkeypatch):
    for k in [k for k in os.environ if k.startswith("OPENRL_")]:
        monkeypatch.delenv(k)
    p = up(trainers=2, samplers=3, trainer_gpus="0,1,2,3", sampler_gpus="3,4", visible=gpus(5))
    for slot in p.trainers:
        assert cli.parser().parse_args(["trainer", *slot.args]).nproc_per_node == 2
    parsed = [cli.parser().parse_args(["sampler", *slot.args]).gpu_memory_fraction for slot in p.samplers]
    assert parsed == fractions(p.samplers) == [0.15, None, 0.15]
    monkeypatch.setenv("OPENRL_GPU_MEMORY_FRACTION", "0.25")
    assert cli.parser().parse_args(["sampler"]).gpu_memory_fraction == 0.25


def test_up_reads_its_placement_flags_and_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("OPENRL_")]:
        monkeypatch.delenv(k)
    args = cli.parser().parse_args(["up"])
    assert (args.trainer_nproc, args.trainer_gpus, args.sampler_gpus, args.sampler_gpu_memory_fraction) == (None, "", "", 0.3)
    for k, v in {"TRAINER_NPROC": "2", "TRAINER_GPUS": "0,1", "SAMPLER_GPUS": "2", "SAMPLER_GPU_MEMORY_FRACTION": "0.4"}.items():
        monkeypatch.setenv(f"OPENRL_{k}", v)
    args = cli.parser().parse_args(["up"])
    assert (args.trainer_nproc, args.trainer_gpus, args.sampler_gpus, args.sampler_gpu_memory_fraction) == (2, "0,1", "2", 0.4)
    args = cli.parser().parse_args(["up", "--trainer-nproc", "1", "--trainer-gpus", "3"])
    assert (args.trainer_nproc, args.trainer_gpus) == (1, "3")


# -- what is refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        # no CUDA at all: any GPU list
        ({"trainer_gpus": "0", "visible": []}, "--trainer-gpus: no CUDA device is visible"),
        ({"sampler_gpus": "0", "visible": []}, "--sampler-gpus: no CUDA device is visible"),
        # an index that does not exist
        ({"trainer_gpus": "0,2", "samplers": 0, "visible": gpus(2)}, "--trainer-gpus: there is no GPU 2; this machine shows 2"),
        ({"sampler_gpus": "7", "visible": gpus(4)}, "--sampler-gpus: there is no GPU 7; this machine shows 4"),
        # not a list of indices
        ({"trainer_gpus": "0,,1", "visible": gpus(2)}, "'' is not a GPU index"),
        ({"trainer_gpus": "-1", "visible": gpus(2)}, "'-1' is not a GPU index"),
        ({"sampler_gpus": "cuda:0", "visible": gpus(2)}, "'cuda:0' is not a GPU index"),
        ({"sampler_gpus": "1.5", "visible": gpus(2)}, "'1.5' is not a GPU index"),
        # duplicates
        ({"trainer_gpus": "0,1,0", "visible": gpus(2)}, "--trainer-gpus 0,1,0: GPU 0 is listed twice"),
        ({"samplers": 2, "sampler_gpus": "1,1", "visible": gpus(2)}, "--sampler-gpus 1,1: GPU 1 is listed twice"),
        # more trainer ranks than trainer GPUs, and GPUs left over
        ({"trainers": 2, "trainer_nproc": 2, "trainer_gpus": "0,1,2", "visible": gpus(4)},
         "--trainers 2 x --trainer-nproc 2 = 4 trainer ranks, but --trainer-gpus lists 3 GPUs"),
        ({"trainers": 1, "trainer_nproc": 1, "trainer_gpus": "0,1", "visible": gpus(2)}, "would leave 1 unused"),
        ({"trainers": 2, "trainer_gpus": "0,1,2", "visible": gpus(3)}, "do not split evenly over --trainers 2"),
        # counts and fractions
        ({"trainer_nproc": 0}, "--trainer-nproc must be >= 1"),
        ({"trainer_nproc": -2}, "--trainer-nproc must be >= 1"),
        ({"trainers": 0}, "--trainers must be >= 1"),
        ({"samplers": -1}, "--samplers must be >= 0"),
        ({"shared_fraction": 0.0}, r"--sampler-gpu-memory-fraction must be in \(0, 1\], got 0.0"),
        ({"shared_fraction": 1.5}, r"--sampler-gpu-memory-fraction must be in \(0, 1\], got 1.5"),
        ({"shared_fraction": -0.3}, r"must be in \(0, 1\]"),
        ({"shared_fraction": float("nan")}, r"must be in \(0, 1\], got nan"),
        # sampler GPUs nobody would use
        ({"samplers": 0, "sampler_gpus": "0", "visible": gpus(1)}, "--sampler-gpus is given, but --samplers is 0"),
        ({"samplers": 2, "sampler_gpus": "0,1,2", "visible": gpus(3)}, "leaving GPU 2 unused; raise --samplers to 3"),
        # so many samplers on one GPU that each would get nothing
        ({"samplers": 400, "trainer_gpus": "0", "sampler_gpus": "0", "visible": gpus(1)}, "400 samplers share GPU 0"),
    ],
)
def test_impossible_placements_are_refused_with_a_clear_message(kw, message):
    with pytest.raises(ValueError, match=message):
        up(**kw)


def test_the_gpu_checks_come_before_the_count_checks():
    """An index that does not exist is named as such, not as a count mismatch."""
    with pytest.raises(ValueError, match="there is no GPU 5"):
        up(trainers=2, trainer_nproc=2, trainer_gpus="0,5", visible=gpus(2))


def test_parse_gpus():
    assert parse_gpus("--x", "") == () and parse_gpus("--x", None) == () and parse_gpus("--x", "  ") == ()
    assert parse_gpus("--x", "3, 1,2") == (3, 1, 2)


# -- the real entry points ------------------------------------------------------------------


def run_openrl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENRL_")}
    return subprocess.run([sys.executable, "-m", "openrl", *args], capture_output=True, text=True, timeout=120,
                          env={**clean, **(env or {})})  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--trainer-gpus", "0,1", "--sampler-gpus", "2"], {"CUDA_VISIBLE_DEVICES": ""},
         "openrl up: --trainer-gpus: no CUDA device is visible"),
        (["--trainer-nproc", "0"], {}, "openrl up: --trainer-nproc must be >= 1"),
        (["--sampler-gpu-memory-fraction", "1.5"], {}, r"openrl up: --sampler-gpu-memory-fraction must be in (0, 1], got 1.5"),
        ([], {"OPENRL_TRAINER_GPUS": "0,0"}, "openrl up: --trainer-gpus 0,0: GPU 0 is listed twice"),
    ],
)
def test_openrl_up_refuses_an_impossible_placement_before_starting_anything(tmp_path, flags, env, message):
    data_dir = tmp_path / "openrl"
    started = time.monotonic()
    done = run_openrl("up", "--data-dir", str(data_dir), *flags, env=env)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert not data_dir.exists(), "openrl up wrote its data dir before refusing"  # so no key, no nats, no logs
    assert time.monotonic() - started < 60


def test_openrl_up_refuses_a_gpu_index_this_machine_does_not_have(tmp_path):
    """On a GPU machine, one past the last GPU; on a CPU machine, the no-CUDA message."""
    count = torch.cuda.device_count()
    done = run_openrl("up", "--data-dir", str(tmp_path / "openrl"), "--sampler-gpus", str(count))
    assert done.returncode != 0
    expected = f"--sampler-gpus: there is no GPU {count}" if count else "--sampler-gpus: no CUDA device is visible"
    assert expected in done.stderr, done.stderr
    assert not (tmp_path / "openrl").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gpu-memory-fraction", "0"], "openrl sampler: --gpu-memory-fraction must be in (0, 1], got 0.0"),
        (["--gpu-memory-fraction", "1.01"], "openrl sampler: --gpu-memory-fraction must be in (0, 1], got 1.01"),
        (["--gpu-memory-fraction", "0.5", "--device", "cpu"],
         "openrl sampler: --gpu-memory-fraction caps a GPU's memory, but this sampler runs on cpu"),
    ],
)
def test_openrl_sampler_refuses_a_bad_memory_fraction(flags, message):
    # A NATS URL nothing listens on: the sampler must stop before it would connect or load.
    done = run_openrl("sampler", "--nats-url", "nats://127.0.0.1:1", *flags)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_transformers_sampler_refuses_a_fraction_off_cuda():
    from openrl.sampler.hf_model import TransformersSampler

    with pytest.raises(ValueError, match="needs a CUDA device, not cpu"):
        TransformersSampler("/nonexistent-model", device="cpu", memory_fraction=0.5)  # refused before it loads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transformers_sampler_caps_its_cuda_memory():
    """The cap is torch's allocator's: an allocation past it raises OOM; below it, it succeeds."""
    script = (
        "import torch\n"
        "from openrl.sampler.hf_model import _cap_memory\n"
        "_cap_memory(torch.device('cuda'), 0.05)\n"
        "total = torch.cuda.get_device_properties(0).total_memory\n"
        "x = torch.empty(int(total * 0.03), dtype=torch.uint8, device='cuda')\n"
        "try:\n"
        "    torch.empty(int(total * 0.04), dtype=torch.uint8, device='cuda')\n"
        "except torch.OutOfMemoryError:\n"
        "    print('capped')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "capped"


def test_docs_name_real_flags_and_variables():
    """docs/gpus.md names only flags `openrl up | sampler | trainer` have and variables they read."""
    import argparse
    import inspect
    import re
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[1] / "docs" / "gpus.md").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("kubectl "))  # kubectl's own flags
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    flags = {o for name in ("up", "sampler", "trainer") for a in sub.choices[name]._actions for o in a.option_strings}  # noqa: SLF001
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text))
    assert named and named <= flags, f"not flags of openrl up/sampler/trainer: {sorted(named - flags)}"
    source = inspect.getsource(cli)
    for var in set(re.findall(r"OPENRL_([A-Z_]+)", text)):
        assert re.search(rf'_env(_\w+)?\("{var}"', source), f"docs/gpus.md names OPENRL_{var}, which openrl does not read"

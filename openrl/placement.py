"""Which GPUs each `openrl up` child gets.

`place` is pure: the flags and the GPUs this machine shows in, per child the environment
(CUDA_VISIBLE_DEVICES) and arguments (`--nproc-per-node`, `--gpu-memory-fraction`) out, or a
ValueError that says what is impossible. `openrl up` calls it before it starts anything.

The rules (docs/gpus.md says the same for users):

- Trainer groups. `--trainer-gpus` is split, in order, into `--trainers` consecutive groups
  of `--trainer-nproc` GPUs: `--trainers 2 --trainer-nproc 2 --trainer-gpus 0,1,2,3` gives
  trainer-0 GPUs 0,1 and trainer-1 GPUs 2,3. Rank K of a group uses the K-th GPU of its group.
  Without `--trainer-nproc` the list is shared out evenly; every listed GPU must be used.
- Samplers. Sampler i gets `--sampler-gpus[i % len]` (round-robin). With
  `--sampler-tensor-parallel-size N` (vLLM samplers), a sampler is N GPUs: the list is split,
  in order, into groups of N, sampler i gets group `i % groups` and `--tensor-parallel-size N`.
- Sharing. Samplers on a GPU split a memory budget evenly: `--sampler-gpu-memory-fraction`
  (default 0.3) where a trainer rank also runs, ALONE_BUDGET where several samplers share a
  GPU with no trainer. A sampler alone on its GPU gets no fraction (its backend's default).
- One list only. The other role is placed as it places itself: a trainer's ranks on the
  first `--trainer-nproc` visible GPUs, a sampler on the first. That is where sharing is
  looked for; such a child gets no CUDA_VISIBLE_DEVICES of its own.
- Neither list: nothing is placed (every process sees every GPU, as without this module).

Indices count the GPUs this process sees; a child's CUDA_VISIBLE_DEVICES names them as the
parent's CUDA_VISIBLE_DEVICES does, so `CUDA_VISIBLE_DEVICES=4,5 openrl up --trainer-gpus 1`
puts the trainer on physical GPU 5.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_SHARED_FRACTION = 0.3  # of a trainer's GPU, for the samplers placed on it
ALONE_BUDGET = 0.9  # of a GPU that only samplers use, split among them (vLLM's own default)


@dataclass(frozen=True)
class Slot:
    """What one child gets on top of its usual command: environment entries and arguments."""

    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    trainers: tuple[Slot, ...]  # one per trainer group, in `openrl up`'s order
    samplers: tuple[Slot, ...]
    trainer_nproc: int  # ranks per trainer group


def visible_gpus(count: int, cuda_visible_devices: str | None) -> list[str]:
    """The GPUs this process sees, as a child's CUDA_VISIBLE_DEVICES must name them.

    `count` is torch.cuda.device_count(); CUDA stops reading CUDA_VISIBLE_DEVICES at its
    first entry that names no device, so only its first `count` entries are real."""
    if cuda_visible_devices is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in cuda_visible_devices.split(",")][:count]


def parse_gpus(flag: str, text: str | None) -> tuple[int, ...]:
    """`0,1,3` -> (0, 1, 3); empty or None -> (). Refuses what is not a list of distinct indices."""
    if not text or not text.strip():
        return ()
    gpus = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():  # also refuses "", "-1", "1.5", "cuda:0"
            raise ValueError(f"{flag} {text}: {item!r} is not a GPU index (give a comma-separated list such as 0,1)")
        gpus.append(int(item))
    twice = sorted(g for g, n in Counter(gpus).items() if n > 1)
    if twice:
        raise ValueError(f"{flag} {text}: GPU {twice[0]} is listed twice (a GPU is given to a role once)")
    return tuple(gpus)


def place(
    *,
    trainers: int,
    samplers: int,
    trainer_nproc: int | None,
    trainer_gpus: str | None,
    sampler_gpus: str | None,
    shared_fraction: float = DEFAULT_SHARED_FRACTION,
    visible: Sequence[str] = (),
    sampler_tp: int = 1,
) -> Placement:
    """Per-child environment and arguments for `openrl up`; ValueError for an impossible placement.

    `trainer_nproc` None means: the trainer GPUs shared out evenly (1 without them).
    `visible` is `visible_gpus(...)`: only needed when a GPU list is given. `sampler_tp`: GPUs per
    sampler (vLLM's tensor parallelism)."""
    if trainers < 1:
        raise ValueError(f"--trainers must be >= 1, got {trainers}")
    if samplers < 0:
        raise ValueError(f"--samplers must be >= 0, got {samplers}")
    if trainer_nproc is not None and trainer_nproc < 1:
        raise ValueError(f"--trainer-nproc must be >= 1 (ranks per trainer), got {trainer_nproc}")
    if sampler_tp < 1:
        raise ValueError(f"--sampler-tensor-parallel-size must be >= 1 (GPUs per sampler), got {sampler_tp}")
    if not (0 < shared_fraction <= 1):  # also refuses NaN
        raise ValueError(f"--sampler-gpu-memory-fraction must be in (0, 1], got {shared_fraction}")
    t_gpus = parse_gpus("--trainer-gpus", trainer_gpus)
    s_gpus = parse_gpus("--sampler-gpus", sampler_gpus)

    if (t_gpus or s_gpus) and not visible:
        flag = "--trainer-gpus" if t_gpus else "--sampler-gpus"
        raise ValueError(f"{flag}: no CUDA device is visible (torch.cuda.device_count() is 0), so there is no GPU to place "
                         f"anything on; leave out --trainer-gpus and --sampler-gpus to run on the CPU")
    for flag, gpus in (("--trainer-gpus", t_gpus), ("--sampler-gpus", s_gpus)):
        missing = [g for g in gpus if g >= len(visible)]
        if missing:
            raise ValueError(f"{flag}: there is no GPU {missing[0]}; this machine shows {len(visible)} "
                             f"(indices 0-{len(visible) - 1}, counted among the GPUs CUDA_VISIBLE_DEVICES leaves visible)")

    nproc = trainer_nproc if trainer_nproc is not None else 1
    if t_gpus and trainer_nproc is None:
        if len(t_gpus) % trainers:
            raise ValueError(f"--trainer-gpus lists {len(t_gpus)} GPUs, which do not split evenly over --trainers {trainers}; "
                             f"list a multiple of {trainers}, or set --trainer-nproc")
        nproc = len(t_gpus) // trainers
    ranks = trainers * nproc
    if t_gpus and ranks > len(t_gpus):
        raise ValueError(f"--trainers {trainers} x --trainer-nproc {nproc} = {ranks} trainer ranks, but --trainer-gpus lists "
                         f"{len(t_gpus)} GPUs: each rank needs a GPU of its own")
    if t_gpus and ranks < len(t_gpus):
        raise ValueError(f"--trainer-gpus lists {len(t_gpus)} GPUs, but --trainers {trainers} x --trainer-nproc {nproc} = "
                         f"{ranks} ranks would leave {len(t_gpus) - ranks} unused; list {ranks}, or raise --trainer-nproc")
    if s_gpus and samplers == 0:
        raise ValueError("--sampler-gpus is given, but --samplers is 0")
    if sampler_tp > 1 and not s_gpus:
        raise ValueError(f"--sampler-tensor-parallel-size {sampler_tp} needs --sampler-gpus: list the GPUs the samplers split")
    if len(s_gpus) % sampler_tp:
        raise ValueError(f"--sampler-gpus lists {len(s_gpus)} GPUs, which do not split into groups of "
                         f"--sampler-tensor-parallel-size {sampler_tp}; list a multiple of {sampler_tp}")
    s_groups = [s_gpus[i:i + sampler_tp] for i in range(0, len(s_gpus), sampler_tp)]
    if len(s_groups) > samplers:
        unused = s_groups[samplers][0]
        if sampler_tp == 1:
            raise ValueError(f"--sampler-gpus lists {len(s_gpus)} GPUs for {samplers} samplers, leaving GPU "
                             f"{unused} unused; raise --samplers to {len(s_gpus)}, or list fewer")
        raise ValueError(f"--sampler-gpus lists {len(s_groups)} groups of {sampler_tp} GPUs for {samplers} samplers, "
                         f"leaving GPU {unused} unused; raise --samplers to {len(s_groups)}, or list fewer")

    def devices(gpus: Sequence[int]) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(visible[g] for g in gpus)}

    groups = [t_gpus[i * nproc:(i + 1) * nproc] for i in range(trainers)] if t_gpus else [()] * trainers
    trainer_slots = tuple(Slot(env=devices(g) if g else {}, args=("--nproc-per-node", str(nproc))) for g in groups)

    if not (t_gpus or s_gpus):
        return Placement(trainers=trainer_slots, samplers=tuple(Slot() for _ in range(samplers)), trainer_nproc=nproc)
    # Where each role runs, placed or not (see the module's docstring), to find shared GPUs.
    trainer_used = set(t_gpus) if t_gpus else set(range(min(nproc, len(visible))))
    sampler_on = [s_groups[i % len(s_groups)] if s_gpus else (0,) for i in range(samplers)]
    on_gpu = Counter(gpu for group in sampler_on for gpu in group)
    tp_args = ("--tensor-parallel-size", str(sampler_tp)) if sampler_tp > 1 else ()
    sampler_slots = []
    for group in sampler_on:
        # A tensor-parallel sampler takes the same share of each of its GPUs: the tightest one's.
        budget = min(shared_fraction if gpu in trainer_used else ALONE_BUDGET for gpu in group)
        n = max(on_gpu[gpu] for gpu in group)
        # Split shares are rounded down to 0.001, so together they never exceed the budget.
        fraction = budget if n == 1 else math.floor(budget / n * 1000 + 1e-9) / 1000
        if fraction <= 0:
            raise ValueError(f"{n} samplers share GPU {group[0]}: {budget} of it leaves each less than 0.001")
        shared = any(gpu in trainer_used for gpu in group) or n > 1
        sampler_slots.append(Slot(env=devices(group) if s_gpus else {},
                                  args=(("--gpu-memory-fraction", str(fraction)) if shared else ()) + tp_args))
    return Placement(trainers=trainer_slots, samplers=tuple(sampler_slots), trainer_nproc=nproc)

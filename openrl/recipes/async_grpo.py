"""Asynchronous GRPO through the unmodified tinker SDK, with rewards scored by OpenRL's
reward workers.

    python -m openrl.recipes.async_grpo --base-url http://127.0.0.1:8000 --api-key tml-... \\
        --steps 20 --max-staleness 1 --log-dir runs/async-grpo

Sampling runs ahead of training. A rollout (one group: `group_size` samples of one prompt)
samples with the newest weights there are, is tagged with their version (the number of
training steps behind them), and is scored by the reward workers (`openrl.client`) while
the trainer works on earlier groups. Training step s uses a group of version v only if
s - v <= max_staleness; older groups are dropped and counted. No group is launched that
could only be used beyond the bound: while the weights are at version v, at most
groups_per_step * (v + max_staleness + 1) useful groups are started, so with
max_staleness 0 this is the synchronous on-policy loop and each extra step of staleness
lets one more batch be sampled and scored during training.

The loss is `importance_sampling` with the sampler's logprobs as the behaviour policy q:
for a group sampled with older weights the ratio p_theta / q corrects for the difference.
Advantages are rewards minus their group's mean (GRPO without the std normalisation).

The command line trains on a toy task measured on the base model first (`measured_tasks`):
chat prompts like those of the default model's warm-up (sums, differences, word tasks), each
rewarding (exact_match) its majority first tokens, so the reward starts between 0.15 and 0.6
whatever the model already knows.

Per step it logs (JSONL in `--log-dir`, and a tqdm bar): `reward/mean`, `time/step`,
`time/wait` (the trainer waiting for groups), `staleness/mean`, `staleness/max`,
`groups/dropped`, `logprob/mismatch` (mean |sampler logprob - trainer logprob| over the
trained tokens; includes the policy change for stale groups) and `logprob/mismatch_fresh`
(the same over groups sampled with the very weights trained on: numerics only), and it
draws the reward curve into `reward.png` (matplotlib, the `plots` extra). With
`--wandb-project` and `--tensorboard-dir` the same metrics go to Weights & Biases and
TensorBoard (the `tracking` extra; `openrl.recipes.tracking`, docs/tracking.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from openrl.recipes.tracking import MetricsLog, Tracking

DEFAULT_MODEL = "openrl/tiny-qwen3"


@dataclass(frozen=True)
class Task:
    """One prompt: the user message and what the reward function gets as `reference`."""

    prompt: str
    reference: Any


@dataclass(frozen=True)
class Config:
    base_url: str
    api_key: str | None
    base_model: str = DEFAULT_MODEL
    reward_name: str = "exact_match"
    steps: int = 20
    groups_per_step: int = 8
    group_size: int = 8
    max_staleness: int = 1
    learning_rate: float = 3e-4
    loss_fn: str = "importance_sampling"  # or ppo, cispo: the same inputs (sampler logprobs, advantages)
    rank: int = 16
    max_tokens: int = 3  # say_word_tasks: a word, then end of turn (the measured toy task: 1)
    temperature: float = 1.0
    seed: int = 0
    log_dir: Path | None = None
    name: str = "async-grpo"
    progress: bool = True
    tracking: Tracking = Tracking()  # W&B and TensorBoard, besides metrics.jsonl
    plots: bool = True  # reward.png in log_dir (needs matplotlib)


@dataclass
class Group:
    """A scored rollout: `group_size` completions of one prompt, sampled with weights `version`."""

    index: int
    version: int
    prompt_G: list[int]
    tokens_G: list[list[int]]
    logprobs_G: list[list[float]]
    rewards_G: list[float]
    errors: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    reward_s: float = 0.0  # time the reward function ran on these completions (summed)


def say_word_tasks(n: int, seed: int = 0) -> list[Task]:
    """"Say the other word: w1 w2 w3"; any of the three words (alone) is right. Whether a
    model leaves RL room to learn here depends on its warm-up: `measured_tasks` does not."""
    from openrl.demo import rl_prompts
    from openrl.default_model import COPY_WORDS

    return [Task(q, {"answers": ws}) for q, ws in rl_prompts(n, COPY_WORDS, seed=seed)]


def measured_tasks(cfg: Config, questions: Sequence[str], *, samples: int = 64) -> list[Task]:
    """Tasks for the `exact_match` reward, measured on the base model (what a new LoRA starts
    from): each question is sampled `samples` times with cfg's max_tokens and temperature, and
    its reference answers are its majority completions (`openrl.demo.majority_answers`, on the
    text as exact_match normalises it). Questions the model nearly always answers one way are
    left out, so the reward starts inside REWARD_BAND and has room to rise on any model.
    `reference["base_rate"]` is the measured share of the answers."""
    import tinker
    from tinker import types

    from openrl.demo import majority_answers
    from openrl.rewarder.builtin import normalize_text

    service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key)
    try:
        sampler = service.create_sampling_client(base_model=cfg.base_model).result()
        tokenizer = sampler.get_tokenizer()
        futures = []
        for i, question in enumerate(questions):
            seed = 10**9 + cfg.seed * 7919 + i  # far from the rollouts' seeds
            params = types.SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=seed)
            futures.append(sampler.sample(types.ModelInput.from_ints(encode_prompt(tokenizer, question)), samples, params))
        tasks = []
        for question, future in zip(questions, futures):
            texts = [normalize_text(tokenizer.decode(s.tokens, skip_special_tokens=True)) for s in future.result().sequences]
            picked = majority_answers(texts)
            if picked is not None:
                tasks.append(Task(question, {"answers": picked[0], "base_rate": picked[1]}))
        return tasks
    finally:
        service.close("success").result()


def encode_prompt(tokenizer, text: str) -> list[int]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(chat, add_special_tokens=False)


def task_order(n_tasks: int, seed: int) -> Callable[[int], int]:
    """Rollout i -> task index: a fresh seeded shuffle of the tasks for every pass."""
    cache: dict[int, list[int]] = {}

    def index(i: int) -> int:
        epoch, k = divmod(i, n_tasks)
        if epoch not in cache:
            order = list(range(n_tasks))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            cache[epoch] = order
        return cache[epoch][k]

    return index


def group_datums(group: Group) -> list:
    """importance_sampling datums of a group: advantage = reward - group mean; samples with
    zero advantage (and empty ones) carry no signal and are left out."""
    from tinker import types

    mean = sum(group.rewards_G) / len(group.rewards_G)
    datums = []
    n_prompt = len(group.prompt_G) - 1  # positions that predict prompt tokens
    for tokens, logprobs, reward in zip(group.tokens_G, group.logprobs_G, group.rewards_G):
        advantage = reward - mean
        if abs(advantage) < 1e-9 or not tokens:
            continue
        full = group.prompt_G + tokens
        datums.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={
                    "target_tokens": full[1:],
                    "logprobs": [0.0] * n_prompt + list(logprobs),
                    "advantages": [0.0] * n_prompt + [advantage] * len(tokens),
                },
            )
        )
    return datums


def mismatch(datums: list, outputs: list[dict], n_completion: list[int]) -> float:
    """Mean |sampler logprob - trainer logprob| over the completion tokens of `datums`."""
    total, count = 0.0, 0
    for datum, out, n in zip(datums, outputs, n_completion):
        q = datum.loss_fn_inputs["logprobs"].tolist()[-n:]
        p = out["logprobs"].tolist()[-n:]
        total += sum(abs(a - b) for a, b in zip(q, p))
        count += n
    return total / count if count else float("nan")


class AsyncGRPO:
    """One run: a rollout producer and the training loop, sharing the newest sampling client."""

    def __init__(self, cfg: Config, tasks: Sequence[Task], training, tokenizer, rewards):
        if cfg.steps < 1 or cfg.groups_per_step < 1 or cfg.group_size < 2 or cfg.max_staleness < 0:
            raise ValueError("need steps >= 1, groups_per_step >= 1, group_size >= 2 and max_staleness >= 0")
        if not tasks:
            raise ValueError("no tasks")
        self.cfg, self.tasks, self.training, self.tokenizer, self.rewards = cfg, list(tasks), training, tokenizer, rewards
        self.prompts = [encode_prompt(tokenizer, t.prompt) for t in self.tasks]
        self.task_of = task_order(len(self.tasks), cfg.seed)
        self.sampler = None  # the newest SamplingClient, of weights `version`
        self.version = 0
        self.launched = 0
        self.dropped = 0
        self.changed = asyncio.Condition()  # version or dropped moved: the producer may launch more
        self.ready: asyncio.Queue[Group | BaseException] = asyncio.Queue()
        self.running: set[asyncio.Task] = set()
        self.run_id = uuid.uuid4().hex  # scoring requests of this run: retried ones are scored once

    async def rollout(self, i: int, sampler, version: int) -> None:
        from tinker import types

        cfg = self.cfg
        try:
            t = self.task_of(i)
            prompt = self.prompts[t]
            params = types.SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed * 7919 + i)
            response = await sampler.sample(types.ModelInput.from_ints(prompt), cfg.group_size, params)
            seqs = response.sequences
            texts = [self.tokenizer.decode(s.tokens, skip_special_tokens=True) for s in seqs]
            items = [{"prompt": self.tasks[t].prompt, "completion": c, "reference": self.tasks[t].reference} for c in texts]
            scores = await self.rewards.score(cfg.reward_name, items, idempotency_key=f"{self.run_id}-{i}")
            metrics: dict[str, float] = {}
            for s in scores:
                for k, v in s.metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + v / len(scores)
            await self.ready.put(
                Group(index=i, version=version, prompt_G=prompt, tokens_G=[list(s.tokens) for s in seqs],
                      logprobs_G=[list(s.logprobs) for s in seqs],
                      rewards_G=[s.reward if s.reward is not None else 0.0 for s in scores],  # a failed item scores 0
                      errors=sum(s.reward is None for s in scores), metrics=metrics, reward_s=sum(s.seconds for s in scores))
            )  # fmt: skip
        except BaseException as e:  # the trainer re-raises it
            await self.ready.put(e)
            if not isinstance(e, Exception):
                raise

    async def produce(self) -> None:
        """Launch rollouts while they can still be used within the staleness bound."""
        cfg = self.cfg
        while True:
            async with self.changed:
                await self.changed.wait_for(
                    lambda: self.launched - self.dropped < cfg.groups_per_step * min(self.version + cfg.max_staleness + 1, cfg.steps)
                )
                i, sampler, version = self.launched, self.sampler, self.version
                self.launched += 1
            task = asyncio.create_task(self.rollout(i, sampler, version))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def next_batch(self, step: int) -> list[Group]:
        batch: list[Group] = []
        while len(batch) < self.cfg.groups_per_step:
            group = await self.ready.get()
            if isinstance(group, BaseException):
                raise group
            if step - group.version > self.cfg.max_staleness:
                async with self.changed:
                    self.dropped += 1
                    self.changed.notify_all()
                continue
            batch.append(group)
        batch.sort(key=lambda g: g.index)  # arrival order varies; the datums' order should not
        return batch

    async def train(self) -> list[dict]:
        from tinker import types
        from tqdm import tqdm

        cfg = self.cfg
        self.sampler = await self.training.save_weights_and_get_sampling_client()
        log = open_log(cfg, f"{cfg.name}: reward (max staleness {cfg.max_staleness})")
        producer = asyncio.create_task(self.produce())
        bar = tqdm(range(cfg.steps), desc=cfg.name, unit="step", disable=not cfg.progress)
        started = time.monotonic()
        ok = False
        try:
            for step in bar:
                t0 = time.monotonic()
                dropped_before = self.dropped
                batch = await self.next_batch(step)
                t_data = time.monotonic()
                datums, n_completion, fresh = [], [], []
                for g in batch:
                    for d in group_datums(g):
                        datums.append(d)
                        n_completion.append(len(d.loss_fn_inputs["target_tokens"].tolist()) - (len(g.prompt_G) - 1))
                        fresh.append(g.version == step)
                row_mismatch = row_fresh = float("nan")
                if datums:
                    fwd = self.training.forward_backward(datums, loss_fn=cfg.loss_fn)
                    opt = self.training.optim_step(types.AdamParams(learning_rate=cfg.learning_rate))
                    out = await fwd
                    await opt
                    row_mismatch = mismatch(datums, out.loss_fn_outputs, n_completion)
                    keep = [k for k, f in enumerate(fresh) if f]
                    row_fresh = mismatch([datums[k] for k in keep], [out.loss_fn_outputs[k] for k in keep], [n_completion[k] for k in keep])
                    sampler = await self.training.save_weights_and_get_sampling_client()
                else:
                    sampler = self.sampler  # nothing to learn from: the weights of step+1 are these
                async with self.changed:
                    self.sampler, self.version = sampler, step + 1
                    self.changed.notify_all()
                rewards = [r for g in batch for r in g.rewards_G]
                staleness = [step - g.version for g in batch]
                row = {
                    "step": step,
                    "reward/mean": sum(rewards) / len(rewards),
                    "time/step": time.monotonic() - t0,
                    "time/wait": t_data - t0,
                    "time/elapsed": time.monotonic() - started,
                    "time/unix": time.time(),
                    "staleness/mean": sum(staleness) / len(staleness),
                    "staleness/max": max(staleness),
                    "groups/dropped": self.dropped - dropped_before,
                    "groups/launched": self.launched,
                    "logprob/mismatch": row_mismatch,
                    "logprob/mismatch_fresh": row_fresh,
                    "datums": len(datums),
                    "reward/errors": sum(g.errors for g in batch),
                    "time/reward_s": sum(g.reward_s for g in batch),
                    **{f"score/{k}": sum(g.metrics.get(k, 0.0) for g in batch) / len(batch) for k in sorted({k for g in batch for k in g.metrics})},
                }  # fmt: skip
                log.append(row)
                bar.set_postfix(reward=f"{row['reward/mean']:.2f}", stale=f"{row['staleness/mean']:.1f}", dropped=self.dropped)
            ok = True
        finally:
            for task in (producer, *self.running):  # rollouts past the last step are not needed
                task.cancel()
            await asyncio.gather(producer, *self.running, return_exceptions=True)
            log.close(ok)
        return log.rows


def open_log(cfg: Config, title: str) -> MetricsLog:
    return MetricsLog(cfg.log_dir, title, name=cfg.name, config=asdict(cfg), tracking=cfg.tracking, plots=cfg.plots)


async def train(cfg: Config, tasks: Sequence[Task], training=None) -> list[dict]:
    """Run async GRPO on `tasks`; returns the per-step metrics. `training`: an existing
    TrainingClient to continue (e.g. after an SFT warm-up); by default a new LoRA model."""
    import tinker

    from openrl.client import AsyncRewardClient

    service = None
    if training is None:
        service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key)
        training = await service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.rank, seed=cfg.seed)
    tokenizer = training.get_tokenizer()
    status = "errored"
    try:
        async with AsyncRewardClient(cfg.base_url, cfg.api_key) as rewards:
            rows = await AsyncGRPO(cfg, tasks, training, tokenizer, rewards).train()
        status = "success"
        return rows
    finally:
        if service is not None:  # ours: finish the session
            await service.close(status)


def train_sequential(cfg: Config, tasks: Sequence[Task], training=None) -> list[dict]:
    """The plain synchronous loop, for comparison: each step saves the weights, samples every
    group, scores them all, then trains. Nothing overlaps: the trainer waits for the samples
    and the rewards, the sampler and the reward workers wait for the trainer."""
    import tinker
    from tinker import types
    from tqdm import tqdm

    from openrl.client import RewardClient

    service = None
    if training is None:
        service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key)
        training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.rank, seed=cfg.seed).result()
    tokenizer = training.get_tokenizer()
    prompts = [encode_prompt(tokenizer, t.prompt) for t in tasks]
    task_of = task_order(len(tasks), cfg.seed)
    started = time.monotonic()
    with RewardClient(cfg.base_url, cfg.api_key) as rewards, open_log(cfg, f"{cfg.name}: reward (sequential)") as log:
        for step in tqdm(range(cfg.steps), desc=cfg.name, unit="step", disable=not cfg.progress):
            t0 = time.monotonic()
            sampler = training.save_weights_and_get_sampling_client().result()
            ids = [task_of(step * cfg.groups_per_step + k) for k in range(cfg.groups_per_step)]
            futures = [
                sampler.sample(types.ModelInput.from_ints(prompts[t]), cfg.group_size,
                               types.SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                                    seed=cfg.seed * 7919 + step * cfg.groups_per_step + k))
                for k, t in enumerate(ids)
            ]  # fmt: skip
            groups = []
            for k, (t, future) in enumerate(zip(ids, futures)):
                seqs = future.result().sequences
                texts = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in seqs]
                scores = rewards.score(cfg.reward_name, [{"prompt": tasks[t].prompt, "completion": c, "reference": tasks[t].reference} for c in texts])
                groups.append(Group(index=k, version=step, prompt_G=prompts[t], tokens_G=[list(s.tokens) for s in seqs],
                                    logprobs_G=[list(s.logprobs) for s in seqs],
                                    rewards_G=[s.reward if s.reward is not None else 0.0 for s in scores],
                                    reward_s=sum(s.seconds for s in scores)))  # fmt: skip
            datums = [d for g in groups for d in group_datums(g)]
            if datums:
                fwd = training.forward_backward(datums, loss_fn=cfg.loss_fn)
                opt = training.optim_step(types.AdamParams(learning_rate=cfg.learning_rate))
                fwd.result()
                opt.result()
            rewards_all = [r for g in groups for r in g.rewards_G]
            log.append({"step": step, "reward/mean": sum(rewards_all) / len(rewards_all), "time/step": time.monotonic() - t0,
                        "time/elapsed": time.monotonic() - started, "staleness/mean": 0.0, "staleness/max": 0, "datums": len(datums),
                        "time/reward_s": sum(g.reward_s for g in groups)})  # fmt: skip
    if service is not None:
        service.close("success").result()
    return log.rows


def add_tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wandb-project", help="log every step to this Weights & Biases project (WANDB_MODE=offline: no network)")
    p.add_argument("--tensorboard-dir", type=Path, help="write TensorBoard event files here")
    p.add_argument("--no-plots", action="store_true", help="draw no PNG chart (matplotlib not needed)")


def tracking_of(args: argparse.Namespace, p: argparse.ArgumentParser) -> Tracking:
    """The trackers the flags ask for; a clear error now, naming the extra, if one is not installed."""
    from openrl.recipes.plot import PlotsUnavailable, require_matplotlib

    tracking = Tracking(wandb_project=args.wandb_project, tensorboard_dir=args.tensorboard_dir)
    try:
        tracking.check()
        if not args.no_plots:
            require_matplotlib()
    except ImportError as e:
        p.error(f"{e}{'; or pass --no-plots' if isinstance(e, PlotsUnavailable) else ''}")
    return tracking


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrl.recipes.async_grpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY"))
    p.add_argument("--base-model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-staleness", type=int, default=1, help="steps off-policy a group may be (0: on-policy)")
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=1, help="1: the measured toy task rewards an answer's first token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="exact_match", help="the reward function's name on the server")
    p.add_argument("--tasks", type=int, default=8, help="how many measured toy prompts to train on (see measured_tasks)")
    p.add_argument("--sequential", action="store_true", help="run the plain synchronous loop instead (for comparison)")
    p.add_argument("--log-dir", type=Path, default=Path("runs/async-grpo"))
    add_tracking_args(p)
    args = p.parse_args(argv)
    tracking = tracking_of(args, p)
    if args.steps < 1 or args.groups_per_step < 1 or args.group_size < 2 or args.max_staleness < 0 or args.tasks < 1 or args.max_tokens < 1:
        p.error("need --steps, --groups-per-step, --tasks, --max-tokens >= 1, --group-size >= 2 and --max-staleness >= 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # get_tokenizer() finds the local default model
    cfg = Config(base_url=args.base_url, api_key=args.api_key, base_model=args.base_model, reward_name=args.reward, steps=args.steps,
                 groups_per_step=args.groups_per_step, group_size=args.group_size, max_staleness=args.max_staleness,
                 learning_rate=args.learning_rate, rank=args.rank, max_tokens=args.max_tokens, seed=args.seed, log_dir=args.log_dir,
                 tracking=tracking, plots=not args.no_plots)  # fmt: skip
    from openrl.demo import rl_questions

    questions = rl_questions(8 * args.tasks, seed=args.seed)
    tasks = measured_tasks(cfg, questions)[: args.tasks]
    if not tasks:
        raise SystemExit(f"none of {len(questions)} prompts leaves room to learn on {cfg.base_model}: it answers each one way nearly always")
    print(f"{len(tasks)} tasks; the base model gives their majority answers {sum(t.reference['base_rate'] for t in tasks) / len(tasks):.2f} of the time")
    rows = train_sequential(cfg, tasks) if args.sequential else asyncio.run(train(cfg, tasks))
    k = max(1, len(rows) // 4)
    early, late = (sum(r["reward/mean"] for r in rs) / len(rs) for rs in (rows[:k], rows[-k:]))
    print(f"reward/mean {early:.3f} (first {k} steps) -> {late:.3f} (last {k}); "
          f"{len(rows) / rows[-1]['time/elapsed']:.2f} steps/s; metrics {args.log_dir / 'metrics.jsonl'}"
          + ("" if args.no_plots else f", plot {args.log_dir / 'reward.png'}"))  # fmt: skip


if __name__ == "__main__":
    main()

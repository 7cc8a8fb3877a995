"""Text-to-SQL: an SFT warm-up, then RL with the execution reward, as K experiments at once
against one OpenRL stack; a table and a plot compare their held-out execution accuracy.

    python -m openrl.recipes.sql_sweep --base-url http://127.0.0.1:8000 --api-key tml-... \\
        --configs sweep.json --log-dir runs/sql-sweep

`--configs` is a JSON list (a file, or the JSON itself) of experiments, each a dict of
`Experiment` fields; without it, the three below (two LoRA ranks, and reward shaping: no
partial credit for a query that runs but is wrong). Every experiment is its own LoRA
model (its own session) on the shared trainer and samplers, and they all run concurrently
in this process. Each one:

1. evaluates the untrained model on the held-out split (greedy, the `sql` reward's
   `correct` metric: the query's result set equals the gold's);
2. SFT: `sft_steps` cross_entropy steps on the gold queries of the training split;
3. evaluates again;
4. RL: `rl_steps` of asynchronous GRPO (`openrl.recipes.async_grpo`) on the training
   split, rewarded by the built-in `sql` reward workers (1 correct, `partial_credit` if
   the query runs, 0 if not);
5. evaluates again.

Writes `<log-dir>/sweep.json` (config and evaluations per experiment), per experiment the
RL metrics (`<name>/metrics.jsonl`, `<name>/reward.png`), and `<log-dir>/heldout_accuracy.png`.
With `--wandb-project` each experiment's RL steps are a W&B run (one group per sweep), with
`--tensorboard-dir` a TensorBoard run in `<tensorboard-dir>/<name>` (docs/tracking.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from openrl.recipes.async_grpo import DEFAULT_MODEL, Config, Task, add_tracking_args, encode_prompt, tracking_of
from openrl.recipes.async_grpo import train as train_rl
from openrl.recipes.text_to_sql_data import Example, make_dataset
from openrl.recipes.tracking import Tracking


@dataclass(frozen=True)
class Experiment:
    name: str
    learning_rate: float = 2e-4  # RL
    sft_learning_rate: float = 1e-2
    rank: int = 16
    partial_credit: float = 0.1  # reward for a query that runs but returns the wrong rows
    sft_steps: int = 40
    sft_batch: int = 16
    rl_steps: int = 10
    groups_per_step: int = 4
    group_size: int = 4
    max_staleness: int = 1
    max_tokens: int = 96
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> Experiment:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown or "name" not in d:
            raise ValueError(f"an experiment needs a name and takes only {sorted(known)}; got {sorted(d)}")
        for f in fields(cls):  # the JSON types of the defaults: str, int, float (an int is a float too)
            v = d.get(f.name, getattr(cls, f.name, ""))
            want = {"str": str, "int": int, "float": (int, float)}[f.type]
            if not isinstance(v, want) or isinstance(v, bool):
                raise ValueError(f"experiment field {f.name} must be a {f.type}, got {v!r}")
        return cls(**d)


DEFAULT_SWEEP = [
    Experiment(name="rank16"),
    Experiment(name="rank4", rank=4),
    Experiment(name="rank16-no-partial", partial_credit=0.0),
]


def sft_datum(tokenizer, prompt: str, answer: str):
    """Chat-formatted example; the answer tokens and the end of turn carry weight."""
    from tinker import types

    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    tokens = prompt_ids + answer_ids
    weights = [0.0] * len(prompt_ids) + [1.0] * len(answer_ids)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]})


async def evaluate(training, tokenizer, rewards, heldout: list[Example], max_tokens: int) -> dict:
    """Greedy answers to every held-out question, scored by the `sql` reward workers."""
    from tinker import types

    sampler = await training.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    responses = await asyncio.gather(
        *(sampler.sample(types.ModelInput.from_ints(encode_prompt(tokenizer, ex.prompt)), 1, params) for ex in heldout)
    )
    completions = [tokenizer.decode(r.sequences[0].tokens, skip_special_tokens=True) for r in responses]
    scores = await rewards.score("sql", [{"prompt": ex.prompt, "completion": c, "reference": ex.reference} for ex, c in zip(heldout, completions)])
    n = len(heldout)
    return {
        "accuracy": sum(s.metrics.get("correct", 0.0) for s in scores) / n,
        "executed": sum(s.metrics.get("executed", 0.0) for s in scores) / n,
        "errors": sum(not s.ok for s in scores),
        "sample": {"question": heldout[0].question, "completion": completions[0], "gold": heldout[0].sql},
    }


async def run_experiment(exp: Experiment, *, base_url: str, api_key: str | None, base_model: str, train: list[Example],
                         heldout: list[Example], log_dir: Path, progress: bool = True, tracking: Tracking = Tracking(),
                         plots: bool = True) -> dict:  # fmt: skip
    import tinker
    from tinker import types

    from openrl.client import AsyncRewardClient

    started = time.monotonic()
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = await service.create_lora_training_client(base_model=base_model, rank=exp.rank, seed=exp.seed)
    tokenizer = training.get_tokenizer()
    evals = []
    async with AsyncRewardClient(base_url, api_key) as rewards:
        evals.append({"phase": "base", **await evaluate(training, tokenizer, rewards, heldout, exp.max_tokens)})
        data = [sft_datum(tokenizer, ex.prompt, ex.sql) for ex in train]
        sft_loss = []
        for step in range(exp.sft_steps):
            batch = [data[(step * exp.sft_batch + i) % len(data)] for i in range(exp.sft_batch)]
            fwd = training.forward_backward(batch, loss_fn="cross_entropy")
            opt = training.optim_step(types.AdamParams(learning_rate=exp.sft_learning_rate))
            out = await fwd
            await opt
            sft_loss.append(out.metrics["loss:sum"] / sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch))
        evals.append({"phase": "sft", **await evaluate(training, tokenizer, rewards, heldout, exp.max_tokens)})
        tasks = [Task(ex.prompt, {**ex.reference, "partial_credit": exp.partial_credit}) for ex in train]
        cfg = Config(base_url=base_url, api_key=api_key, base_model=base_model, reward_name="sql", steps=exp.rl_steps,
                     groups_per_step=exp.groups_per_step, group_size=exp.group_size, max_staleness=exp.max_staleness,
                     learning_rate=exp.learning_rate, rank=exp.rank, max_tokens=exp.max_tokens, seed=exp.seed,
                     log_dir=log_dir / exp.name, name=exp.name, progress=progress, tracking=tracking.for_run(exp.name),
                     plots=plots)  # fmt: skip
        rl = await train_rl(cfg, tasks, training=training) if exp.rl_steps > 0 else []
        evals.append({"phase": "rl", **await evaluate(training, tokenizer, rewards, heldout, exp.max_tokens)})
    await service.close("success")
    return {
        "experiment": asdict(exp),
        "model_id": training.model_id,
        "sft_loss": sft_loss,
        "rl_reward": [r["reward/mean"] for r in rl],
        "evals": evals,
        "seconds": time.monotonic() - started,
    }


def table(results: list[dict]) -> str:
    head = f"{'experiment':<22} {'lr':>8} {'rank':>4} {'partial':>7} {'sft loss':>9} {'rl reward':>17}  held-out accuracy (executed)"
    lines = [head, "-" * len(head)]
    for r in results:
        e, ev = r["experiment"], {x["phase"]: x for x in r["evals"]}
        loss = f"{r['sft_loss'][0]:.2f}>{r['sft_loss'][-1]:.2f}" if r["sft_loss"] else "-"
        rl = f"{r['rl_reward'][0]:.3f}>{r['rl_reward'][-1]:.3f}" if r["rl_reward"] else "-"
        acc = "  ".join(f"{p} {ev[p]['accuracy']:.3f} ({ev[p]['executed']:.2f})" for p in ("base", "sft", "rl"))
        lines.append(f"{e['name']:<22} {e['learning_rate']:>8.0e} {e['rank']:>4} {e['partial_credit']:>7.2f} {loss:>9} {rl:>17}  {acc}")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path:
    from openrl.recipes.plot import line_chart

    series = {r["experiment"]["name"]: [(i, ev["accuracy"]) for i, ev in enumerate(r["evals"])] for r in results}
    return line_chart(path, series, title="text-to-SQL: held-out accuracy", x_label="0 base, 1 after SFT, 2 after RL",
                      y_label="execution accuracy", y_range=(0.0, max(0.2, max(v for s in series.values() for _, v in s))),
                      x_ticks=[0, 1, 2])  # fmt: skip


async def sweep(experiments: list[Experiment], *, base_url: str, api_key: str | None, base_model: str = DEFAULT_MODEL,
                log_dir: Path, seed: int = 0, progress: bool = True, tracking: Tracking = Tracking(),
                plots: bool = True) -> list[dict]:  # fmt: skip
    """Run the experiments concurrently; write sweep.json and the accuracy plot; return the results."""
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment names must be unique, got {names}")
    if tracking.wandb_project and not tracking.wandb_group:  # this sweep's runs, side by side in W&B
        tracking = replace(tracking, wandb_group=f"sql-sweep-{uuid.uuid4().hex[:8]}")
    train, heldout = make_dataset(seed)
    results = await asyncio.gather(
        *(run_experiment(e, base_url=base_url, api_key=api_key, base_model=base_model, train=train, heldout=heldout,
                         log_dir=log_dir, progress=progress, tracking=tracking, plots=plots) for e in experiments)
    )  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "sweep.json").write_text(json.dumps({"train": len(train), "heldout": len(heldout), "results": results}, indent=1))
    if plots:
        plot(results, log_dir / "heldout_accuracy.png")
    return results


def load_configs(text: str | None) -> list[Experiment]:
    if text is None:
        return list(DEFAULT_SWEEP)
    raw = json.loads(text) if text.lstrip()[:1] in ("[", "{") else json.loads(Path(text).read_text())
    if not isinstance(raw, list) or not raw or not all(isinstance(d, dict) for d in raw):
        raise ValueError("--configs must be a non-empty JSON list of experiment objects")
    return [Experiment.from_dict(d) for d in raw]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrl.recipes.sql_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY"))
    p.add_argument("--base-model", default=DEFAULT_MODEL)
    p.add_argument("--configs", help="a JSON list of experiments (file path or JSON text); default: a 3-experiment sweep")
    p.add_argument("--seed", type=int, default=0, help="the dataset's seed")
    p.add_argument("--log-dir", type=Path, default=Path("runs/sql-sweep"))
    add_tracking_args(p)
    args = p.parse_args(argv)
    tracking = tracking_of(args, p)
    try:
        experiments = load_configs(args.configs)
    except (OSError, ValueError, TypeError) as e:
        p.error(f"--configs: {e}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = asyncio.run(sweep(experiments, base_url=args.base_url, api_key=args.api_key, base_model=args.base_model,
                                log_dir=args.log_dir, seed=args.seed, tracking=tracking, plots=not args.no_plots))  # fmt: skip
    print(table(results))
    print(f"results {args.log_dir / 'sweep.json'}" + ("" if args.no_plots else f", plot {args.log_dir / 'heldout_accuracy.png'}"))


if __name__ == "__main__":
    main()

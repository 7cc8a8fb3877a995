"""One attempt of the async-grpo study: params.json -> async GRPO on the stack ->
metrics.jsonl in $OPENRL_ATTEMPT_DIR (run by `openrl autoresearch`, which sets
TINKER_BASE_URL, TINKER_API_KEY and OPENRL_ATTEMPT_DIR)."""

import asyncio
import json
import os
from pathlib import Path

from openrl.demo import rl_questions
from openrl.recipes.async_grpo import Config, measured_tasks, train

p = json.loads(Path("params.json").read_text())
cfg = Config(base_url=os.environ["TINKER_BASE_URL"], api_key=os.environ.get("TINKER_API_KEY"), steps=p["steps"],
             groups_per_step=p["groups_per_step"], group_size=p["group_size"], max_staleness=p["max_staleness"],
             learning_rate=p["learning_rate"], loss_fn=p["loss"], rank=p["rank"], max_tokens=1, seed=p["seed"],
             log_dir=Path(os.environ["OPENRL_ATTEMPT_DIR"]), name="attempt", progress=False, plots=False)
# The same prompts for every attempt (seeded; measured on the base model, which no attempt changes).
tasks = measured_tasks(cfg, rl_questions(8 * p["tasks"], seed=p["seed"]), samples=p["measure_samples"])[: p["tasks"]]
if not tasks:
    raise SystemExit("no prompt leaves the base model room to learn")
rows = asyncio.run(train(cfg, tasks))
print(f"{len(tasks)} tasks, reward/mean {rows[0]['reward/mean']:.3f} -> {rows[-1]['reward/mean']:.3f}")

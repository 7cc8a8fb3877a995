"""One attempt of the text-to-sql study: params.json -> SFT then GRPO with the `sql` reward
on the stack -> held-out accuracy per phase in $OPENRL_ATTEMPT_DIR/metrics.jsonl."""

import asyncio
import json
import os
from dataclasses import fields
from pathlib import Path

from openrl.recipes.sql_sweep import Experiment, run_experiment
from openrl.recipes.text_to_sql_data import make_dataset

p = json.loads(Path("params.json").read_text())
attempt_dir = Path(os.environ["OPENRL_ATTEMPT_DIR"])
known = {f.name for f in fields(Experiment)}
exp = Experiment(name="attempt", **{k: v for k, v in p.items() if k in known and k != "name"})
train, heldout = make_dataset(p["seed"])
result = asyncio.run(run_experiment(exp, base_url=os.environ["TINKER_BASE_URL"], api_key=os.environ.get("TINKER_API_KEY"),
                                    base_model=p["base_model"], train=train, heldout=heldout, log_dir=attempt_dir / "rl",
                                    progress=False, plots=False))
with open(attempt_dir / "metrics.jsonl", "w") as f:
    for step, ev in enumerate(result["evals"]):
        f.write(json.dumps({"step": step, "phase": ev["phase"], "heldout/accuracy": ev["accuracy"], "heldout/executed": ev["executed"]}) + "\n")
print(" ".join(f"{ev['phase']} {ev['accuracy']:.3f}" for ev in result["evals"]))

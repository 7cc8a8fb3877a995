"""The text-to-SQL dataset generator (in process) and a short two-experiment sweep end to end
against the stack (SFT, RL scored by the built-in `sql` rewarders, held-out evaluation)."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
from PIL import Image

from openrl.recipes.sql_sweep import Experiment, load_configs, sweep, table
from openrl.recipes.tracking import Tracking
from tracking_readback import assert_tracked_like_jsonl, wandb_offline_run
from openrl.recipes.text_to_sql_data import make_dataset, main as write_dataset
from openrl.rewarder.builtin import build_database, run_query, sql_execution

pytestmark = pytest.mark.timeout(600)


def test_dataset_gold_runs_splits_are_disjoint_and_generation_is_deterministic(tmp_path):
    train, heldout = make_dataset(seed=0)
    assert len(train) >= 40 and len(heldout) >= 10
    assert not {e.question for e in train} & {e.question for e in heldout}
    assert len({(e.db, e.question) for e in train + heldout}) == len(train + heldout)
    assert len({e.db for e in heldout}) >= 3 and len({e.db for e in train}) == 4
    nonempty = 0
    for ex in train + heldout:
        ref = ex.reference
        assert set(ref) == {"schema", "rows", "gold"} and ref["gold"] == ex.sql and ex.question in ex.prompt
        # The built-in reward gives the gold full marks and a wrong query the partial credit.
        assert sql_execution(ex.prompt, f"```sql\n{ex.sql}\n```", ref) == {"reward": 1.0, "executed": 1.0, "correct": 1.0}
        assert sql_execution(ex.prompt, "SELECT 12345", ref)["reward"] == 0.1
        nonempty += bool(run_query(build_database(ref["schema"], ref["rows"]), ex.sql))
    assert nonempty == len(train + heldout)  # every gold query returns rows (COUNT/AVG included)
    # The same seed gives the same data; another seed other rows.
    again = make_dataset(seed=0)
    assert (train, heldout) == again
    other_train, _ = make_dataset(seed=1)
    assert {json.dumps(e.reference["rows"]) for e in other_train} != {json.dumps(e.reference["rows"]) for e in train}
    # The JSONL writer writes the same splits.
    write_dataset(["--out", str(tmp_path), "--seed", "0"])
    rows = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [e.question for e in heldout]
    # The schema is plain sqlite DDL.
    conn = sqlite3.connect(":memory:")
    conn.executescript(train[0].reference["schema"])


def test_bad_sweep_configs_are_refused():
    for bad in ('[{"learning_rate": 1}]', '[{"name": "a", "lr": 1}]', "[]", '{"name": "a"}', '[{"name": "a", "rank": "4"}]'):
        with pytest.raises(ValueError):
            load_configs(bad)
    assert [e.name for e in load_configs('[{"name": "a", "rank": 4}]')] == ["a"]


def png_colours(path) -> set[tuple[int, int, int]]:
    with Image.open(path) as im:
        return {px[:3] for px in im.convert("RGB").getdata()}


def test_sweep_of_two_experiments_end_to_end(stack, tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
                        "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache"}.items():  # fmt: skip
        monkeypatch.setenv(name, str(value))
    small = dict(sft_steps=6, sft_batch=8, rl_steps=2, groups_per_step=2, group_size=4, max_tokens=24)
    experiments = [Experiment(name="lr3e-3", sft_learning_rate=3e-3, **small),
                   Experiment(name="rank4-no-partial", sft_learning_rate=3e-3, rank=4, partial_credit=0.0, **small)]  # fmt: skip
    tracking = Tracking(wandb_project="openrl-test", tensorboard_dir=tmp_path / "tb")
    results = asyncio.run(sweep(experiments, base_url=stack.url, api_key=stack.api_key, log_dir=tmp_path, progress=False, tracking=tracking))
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results)) and saved["heldout"] == len(make_dataset(0)[1])
    assert len({r["model_id"] for r in results}) == 2  # two models on the one trainer
    for r in results:
        assert [e["phase"] for e in r["evals"]] == ["base", "sft", "rl"]
        for e in r["evals"]:
            assert 0.0 <= e["accuracy"] <= e["executed"] <= 1.0 and e["errors"] == 0
        assert len(r["sft_loss"]) == 6 and r["sft_loss"][-1] < r["sft_loss"][0]  # SFT learned something
        rows = [json.loads(line) for line in (tmp_path / r["experiment"]["name"] / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(x["staleness/max"] <= 1 and x["reward/errors"] == 0 for x in rows)
        assert all("score/executed" in x and "score/correct" in x for x in rows)  # the sql reward's metrics
        assert png_colours(tmp_path / r["experiment"]["name"] / "reward.png")
        # Each experiment is a W&B run of the sweep's group and a TensorBoard run of its own.
        assert_tracked_like_jsonl(rows, tmp_path / "tb" / r["experiment"]["name"], tmp_path / r["experiment"]["name"] / "wandb")
    groups = {wandb_offline_run(next((tmp_path / n / "wandb").glob("offline-run-*")))[0]["group"] for n in ("lr3e-3", "rank4-no-partial")}
    assert len(groups) == 1 and groups.pop().startswith("sql-sweep-")
    printed = table(results)
    assert "lr3e-3" in printed and "rank4-no-partial" in printed
    pixels = png_colours(tmp_path / "heldout_accuracy.png")
    assert (31, 119, 180) in pixels and (214, 39, 40) in pixels  # one line per experiment

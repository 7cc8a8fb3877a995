"""The recipes' metrics sinks without a stack: metrics.jsonl, W&B offline and TensorBoard read
back equal; the chart is drawn by matplotlib; a missing extra is named before any work."""

from __future__ import annotations

import re
import sys

import pytest
from PIL import Image

from openrl.recipes import async_grpo, sql_sweep
from openrl.recipes.plot import PlotsUnavailable, line_chart
from openrl.recipes.tracking import MetricsLog, Tracking, TrackingUnavailable
from tracking_readback import assert_tracked_like_jsonl, jsonl, wandb_offline_run


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B with no account and no network: runs are written locally, nothing is reported."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
                        "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                        "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():  # fmt: skip
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def rows_of_a_run(n: int = 5) -> list[dict]:
    return [
        {"step": s, "reward/mean": 0.25 + 0.1 * s, "time/step": 1.5 + s / 7, "staleness/max": s % 2, "datums": 10 + s,
         "logprob/mismatch_fresh": float("nan") if s == 0 else 1e-4 * s, "score/correct": s / n, "note": "not a number"}
        for s in range(n)
    ]  # fmt: skip


def test_metrics_log_writes_jsonl_wandb_offline_and_tensorboard_alike(tmp_path, wandb_offline):
    tracking = Tracking(wandb_project="openrl-test", wandb_group="g1", tensorboard_dir=tmp_path / "tb")
    config = {"learning_rate": 3e-4, "api_key": "tml-secret-key", "log_dir": tmp_path}
    with MetricsLog(tmp_path / "run", "a title", name="run-a", config=config, tracking=tracking) as log:
        for row in rows_of_a_run():
            log.append(row)
    rows = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 5 and rows[1]["reward/mean"] == 0.35
    assert_tracked_like_jsonl(rows, tmp_path / "tb", tmp_path / "run" / "wandb")
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    run, logged_config, _ = wandb_offline_run(run_dir)
    assert run == {"project": "openrl-test", "group": "g1", "name": "run-a"}
    assert logged_config["learning_rate"] == 3e-4 and logged_config["log_dir"] == str(tmp_path)
    assert "api_key" not in logged_config and b"tml-secret-key" not in next(run_dir.glob("*.wandb")).read_bytes()
    with Image.open(tmp_path / "run" / "reward.png") as im:
        assert im.size == (720, 420)


def test_sweep_runs_each_get_a_tensorboard_folder_and_can_be_open_at_once(tmp_path, wandb_offline):
    tracking = Tracking(wandb_project="openrl-test", wandb_group="sweep", tensorboard_dir=tmp_path / "tb")
    logs = [MetricsLog(tmp_path / name, name, name=name, tracking=tracking.for_run(name), plots=False) for name in ("a", "b")]
    for row in rows_of_a_run(3):
        for i, log in enumerate(logs):  # interleaved, as concurrent experiments log
            log.append({**row, "reward/mean": row["reward/mean"] + i})
    for log in logs:
        log.close()
    for name in ("a", "b"):
        assert_tracked_like_jsonl(jsonl(tmp_path / name / "metrics.jsonl"), tmp_path / "tb" / name, tmp_path / name / "wandb")
        assert not (tmp_path / name / "reward.png").exists()


def test_line_chart_draws_each_series_in_its_colour(tmp_path):
    path = line_chart(tmp_path / "c.png", {"a": [(0, 1.0), (1, None), (2, 3.0)], "b": [(0, 2.0), (2, float("nan"))]}, title="t")
    with Image.open(path) as im:
        assert im.size == (720, 420)
        colours = {px[:3] for px in im.convert("RGB").getdata()}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # the first two series


@pytest.mark.parametrize(
    "missing, flags, message",
    [
        ("matplotlib", [], r"matplotlib.*\[plots\].*--no-plots"),
        ("wandb", ["--wandb-project", "p", "--no-plots"], r"wandb is not installed.*\[tracking\]"),
        ("tensorboard", ["--tensorboard-dir", "tb", "--no-plots"], r"tensorboard is not installed.*\[tracking\]"),
    ],
)
def test_a_missing_extra_is_named_before_any_work(tmp_path, monkeypatch, capsys, missing, flags, message):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    for recipe in (async_grpo, sql_sweep):
        log_dir = tmp_path / recipe.__name__
        with pytest.raises(SystemExit) as e:  # no stack runs at this URL: it must stop before calling it
            recipe.main(["--base-url", "http://127.0.0.1:9", "--log-dir", str(log_dir), *flags])
        assert e.value.code == 2
        assert re.search(message, capsys.readouterr().err)
        assert not log_dir.exists()


def test_missing_extras_raise_import_errors_from_the_library(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(PlotsUnavailable, match=r"\[plots\]"):
        line_chart(tmp_path / "c.png", {"a": [(0, 1.0)]})
    with pytest.raises(PlotsUnavailable):
        MetricsLog(tmp_path / "run", "t")
    with pytest.raises(TrackingUnavailable, match=r"\[tracking\]"):
        MetricsLog(tmp_path / "run", "t", tracking=Tracking(wandb_project="p"), plots=False)
    assert not (tmp_path / "run").exists()
    MetricsLog(None, "t").close()  # no log dir, no trackers: nothing needed

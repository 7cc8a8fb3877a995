"""tinker-cookbook's own recipes, unmodified, against the stack (docs/cookbook.md).

The cookbook accepts only the models in its registry, so the default model is installed
under a name it knows (`openrl prepare --alias Qwen/Qwen3-8B`, in the tests' own HF cache)
and served by a trainer and a sampler added to the stack for that base model, the way a
second base model is deployed. Each recipe then runs as a user would run it: its module
as a script, configured only by its command-line options. Offline: sl_basic reads the
conversation file the cookbook ships, rl_basic and math_rl use the cookbook's arithmetic
environment (the recipes' default datasets are downloads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stack_helpers import API_KEY
from test_shutdown import Proc, wait_for

pytestmark = pytest.mark.timeout(900)

ALIAS = "Qwen/Qwen3-8B"
RENDERER = "qwen3"

try:
    import tinker_cookbook
except ImportError:  # pragma: no cover - depends on the environment
    tinker_cookbook = None
    if os.environ.get("OPENRL_COOKBOOK_REQUIRED") == "1":
        raise
    pytest.skip("tinker-cookbook is not installed (see docs/cookbook.md)", allow_module_level=True)


@pytest.fixture(scope="module")
def alias_stack(stack, tmp_path_factory):
    """The stack, also serving the default model as ALIAS (a trainer and a sampler of its own)."""
    from openrl.default_model import install_alias, remove_alias

    install_alias(ALIAS)
    logs = tmp_path_factory.mktemp("cookbook-workers")
    env = {"OPENRL_NATS_URL": stack.nats_url, "OPENRL_BASE_MODEL": ALIAS, "OPENRL_THREADS": "1"}
    procs = {kind: Proc(logs, kind, {**env, "OPENRL_WORKER_ID": f"cookbook-{kind}"}) for kind in ("trainer", "sampler")}
    try:
        for proc in procs.values():
            proc.wait_ready(180)
        wait_for(lambda: "cookbook-trainer" in stack.healthz()["trainers"] and "cookbook-sampler" in stack.healthz()["samplers"], 60, every_s=0.3)
        yield stack
    finally:
        remove_alias(ALIAS)
        for proc in procs.values():
            if proc.proc.poll() is None:
                proc.sigterm()  # a graceful stop also removes the heartbeat
            else:
                proc.kill()


def cookbook(stack, module: str, *options: str, cwd: Path, expect_ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ, "TINKER_API_KEY": API_KEY, "TINKER_BASE_URL": stack.url, "HF_DATASETS_OFFLINE": "1",
        # Offline, enforced: the cookbook fetches a pricing file over https (and logs token
        # counts only when that fails); any https request goes to a closed port instead.
        "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-m", module, f"base_url={stack.url}", f"model_name={ALIAS}", *options],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )
    if expect_ok:
        assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoints(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines() if line.strip()]


def test_sl_basic_loss_falls(alias_stack, tmp_path):
    conversations = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    log_path = tmp_path / "sl"
    cookbook(
        alias_stack, "tinker_cookbook.recipes.sl_basic",
        f"log_path={log_path}",
        "dataset_builder=tinker_cookbook.supervised.data:FromConversationFileBuilder",
        f"dataset_builder.file_path={conversations}",
        f"dataset_builder.common_config.model_name_for_tokenizer={ALIAS}",
        f"dataset_builder.common_config.renderer_name={RENDERER}",
        "dataset_builder.common_config.max_length=512",
        "dataset_builder.common_config.batch_size=8",
        cwd=tmp_path,
    )
    nll = [m["train_mean_nll"] for m in metrics(log_path) if "train_mean_nll" in m]
    assert len(nll) == 16, nll  # 128 conversations in batches of 8, one epoch
    first, last = sum(nll[:3]) / 3, sum(nll[-3:]) / 3
    assert last < first - 0.3, nll
    final = [c for c in checkpoints(log_path) if c["name"] == "final"]
    assert final and final[0]["state_path"].startswith("tinker://")


def test_rl_basic_completes(alias_stack, tmp_path):
    """...and logs to Weights & Biases offline (its own wandb_project option), as docs/cookbook.md shows."""
    from recipes.tracking_readback import wandb_offline_run

    log_path = tmp_path / "rl"
    wandb_env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
                 "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}  # fmt: skip
    cookbook(
        alias_stack, "tinker_cookbook.recipes.rl_basic",
        f"log_path={log_path}", "max_tokens=16", "wandb_project=openrl-cookbook", "wandb_name=rl-basic-arith",
        "dataset_builder=tinker_cookbook.recipes.math_rl.arithmetic_env:ArithmeticDatasetBuilder",
        "dataset_builder.batch_size=8", "dataset_builder.group_size=4", "dataset_builder.n_batches=3",
        f"dataset_builder.model_name_for_tokenizer={ALIAS}", f"dataset_builder.renderer_name={RENDERER}",
        cwd=tmp_path, env=wandb_env,
    )
    steps = [m for m in metrics(log_path) if "env/all/format" in m]
    assert [m["step"] for m in steps] == [0, 1, 2]
    (run_dir,) = (log_path / "wandb").glob("offline-run-*")
    run, _, history = wandb_offline_run(run_dir)
    assert run["project"] == "openrl-cookbook" and run["name"] == "rl-basic-arith"
    logged = [h for h in history if "env/all/format" in h]
    assert [(h["_step"], h["env/all/format"]) for h in logged] == [(m["step"], m["env/all/format"]) for m in steps]
    # Every rollout came back from the sampler as text the renderer parsed (format is scored on it).
    assert all(m["env/all/format"] > 0 for m in steps), steps
    assert any(c["name"] == "final" for c in checkpoints(log_path))


MATH_RL = (
    "env=arithmetic", "group_size=4", "groups_per_batch=8", "max_tokens=8", "eval_every=0",
    "save_every=2", "learning_rate=1e-4", "behavior_if_log_dir_exists=resume",
)


def test_math_rl_saves_and_resumes(alias_stack, tmp_path):
    log_path = tmp_path / "math"
    options = (f"log_path={log_path}", "loss_fn=importance_sampling", *MATH_RL)
    cookbook(alias_stack, "tinker_cookbook.recipes.math_rl.train", *options, "max_steps=3", cwd=tmp_path)
    saved = checkpoints(log_path)
    assert [c["batch"] for c in saved] == [2, 3], saved  # save_every=2, then the final state
    first_session = saved[-1]["state_path"]

    second = cookbook(alias_stack, "tinker_cookbook.recipes.math_rl.train", *options, "max_steps=5", cwd=tmp_path)
    out = second.stdout + second.stderr
    assert f"Resumed training from {first_session}" in out, out[-3000:]
    steps = [m["step"] for m in metrics(log_path) if "env/all/format" in m]
    assert steps == [0, 1, 2, 3, 4], steps  # continued at the saved step: none repeated, none skipped
    resumed = checkpoints(log_path)[2:]
    assert [c["batch"] for c in resumed] == [4, 5], resumed
    # The resumed run is a new training client created from the saved state (with its optimizer).
    assert all(not c["state_path"].startswith(first_session.split(":train:")[0]) for c in resumed)


def test_math_rl_default_loss_is_refused_with_the_alternatives(alias_stack, tmp_path):
    """The cookbook's default RL loss, stable_reinforce, is unpublished: a clear error, not a hang."""
    proc = cookbook(
        alias_stack, "tinker_cookbook.recipes.math_rl.train",
        f"log_path={tmp_path / 'sr'}", *MATH_RL, "max_steps=1", cwd=tmp_path, expect_ok=False,
    )
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "stable_reinforce" in err and "use importance_sampling, ppo or cispo instead" in err, err[-3000:]

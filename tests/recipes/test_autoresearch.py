"""`openrl autoresearch`: study.toml checked before anything runs; the harness with a toy
attempt (a script that scores params.json) for its bookkeeping — Optuna proposals shared
by researchers, a scripted agent through cmd:, failed / overrun / forbidden attempts, Ctrl-C —
and the shipped async-grpo study against a real stack, where the search beats the default
configuration measured by the same harness as attempt 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from openrl.recipes.autoresearch.study import StudyError, load_study, read_metric
from stack_helpers import BASE_MODEL, alive

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "autoresearch"

TOY_TOML = """\
[study]
command = "python attempt.py"
budget_s = {budget}
researchers = {researchers}
attempts = {attempts}
seed = 1

[metric]
key = "score"
goal = "maximize"

[params.x]
type = "float"
low = 0.001
high = 10.0
log = true
default = 0.01

[params.n]
type = "int"
low = 0
high = 6
default = 0

[params.kind]
type = "categorical"
choices = ["a", "b", "c"]
default = "a"
"""

# score = -log10(x)^2 - (n-3)^2 + bonus(kind): best near x=1, n=3, kind b. `mode` makes an
# attempt fail (exit 3) or hang (a grandchild sleeps too: the whole process group must die).
TOY_ATTEMPT = """\
import json, math, os, pathlib, subprocess, sys, time
p = json.loads(pathlib.Path("params.json").read_text())
out = pathlib.Path(os.environ["OPENRL_ATTEMPT_DIR"])
(out / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in ("TINKER_BASE_URL", "TINKER_API_KEY", "OPENRL_PARAMS")}))
mode = p.get("mode")
if mode == "fail":
    sys.exit(3)
if mode == "hang":
    child = subprocess.Popen(["sleep", "300"])
    (out / "pids").write_text(f"{os.getpid()} {child.pid}")
    time.sleep(300)
pathlib.Path("scratch.txt").write_text("an attempt's own output in the worktree: never committed")
score = -math.log10(p["x"]) ** 2 - (p["n"] - 3) ** 2 + {"a": 0.0, "b": 1.0, "c": 0.5}[p["kind"]]
with open(out / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 0, "score": score - 1}) + "\\n")
    f.write(json.dumps({"step": 1, "score": score}) + "\\n")
"""


def toy_study(path: Path, *, budget: float = 30, researchers: int = 1, attempts: int = 4, params: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "study.toml").write_text(TOY_TOML.format(budget=budget, researchers=researchers, attempts=attempts))
    (path / "params.json").write_text(json.dumps(params or {"x": 0.01, "n": 0, "kind": "a"}) + "\n")
    (path / "program.md").write_text("Maximise score.\n")
    (path / "attempt.py").write_text(TOY_ATTEMPT)
    return path


def autoresearch(study: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINKER_BASE_URL": "http://127.0.0.1:9", "TINKER_API_KEY": "tml-toy-secret", **(env or {})}
    return subprocess.run([sys.executable, "-m", "openrl", "autoresearch", str(study), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


def ledger(study: Path) -> list[dict]:
    return [json.loads(line) for line in (study / "run" / "ledger.jsonl").read_text().splitlines()]  # every line valid JSON


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def assert_worktrees_clean(study: Path) -> None:
    trees = sorted((study / "run" / "worktrees").iterdir())
    assert trees
    for tree in trees:
        assert git(tree, "status", "--porcelain", "--untracked-files=all", "--ignored") == "", tree


# -- study.toml ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda t: t.replace('command = "python attempt.py"\n', ""), "study.command is missing"),
        (lambda t: t.replace("budget_s = 30", 'budget_s = "30"'), "study.budget_s must be int or float"),
        (lambda t: t.replace("budget_s = 30", "budget_s = 0"), "study.budget_s must be > 0"),
        (lambda t: t.replace("researchers = 1", "researchers = 0"), "study.researchers must be >= 1"),
        (lambda t: t.replace("researchers = 1", "reseachers = 1"), "study has unknown field(s) reseachers"),
        (lambda t: t.replace('key = "score"\n', ""), "metric.key is missing"),
        (lambda t: t.replace('goal = "maximize"', 'goal = "up"'), "metric.goal must be maximize or minimize"),
        (lambda t: t.replace("[metric]", "[metrics]"), "the top level has unknown field(s) metrics"),
        (lambda t: t.replace("high = 10.0", "high = 0.0001"), "params.x needs low < high"),
        (lambda t: t.replace("default = 0.01", "default = 99.0"), "params.x.default 99.0 is outside"),
        (lambda t: t.replace("low = 0.001", "low = 0.0"), "params.x.low must be > 0 with log = true"),
        (lambda t: t.replace('type = "int"', 'type = "integer"'), "params.n.type must be float, int or categorical"),
        (lambda t: t.replace("low = 0\n", "low = 0.5\n"), "params.n.low must be int"),
        (lambda t: t.replace('default = "a"', 'default = "z"'), "params.kind.default 'z' is not one of its choices"),
        (lambda t: t.replace("seed = 1", "seed = 1\neditable = ['../escape.py']"), "study.editable must list paths inside the study"),
        (lambda t: t + "[broken", "is not valid TOML"),
    ],
)
def test_a_wrong_study_toml_is_named_before_anything_runs(tmp_path, edit, named):
    study = toy_study(tmp_path / "study")
    (study / "study.toml").write_text(edit((study / "study.toml").read_text()))
    with pytest.raises(StudyError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_study(study)
    r = autoresearch(study)
    assert r.returncode == 2 and named in r.stderr, r.stderr
    assert not (study / "run").exists() and not (study / ".git").exists()  # nothing ran, no repo made


def test_missing_files_and_stack_are_named(tmp_path):
    study = toy_study(tmp_path / "study")
    (study / "program.md").unlink()
    with pytest.raises(StudyError, match="program.md is missing"):
        load_study(study)
    (study / "program.md").write_text("x")
    (study / "study.toml").unlink()
    with pytest.raises(StudyError, match="study.toml is missing"):
        load_study(study)
    study = toy_study(tmp_path / "study2")
    env = {k: v for k, v in os.environ.items() if k not in ("TINKER_BASE_URL", "TINKER_API_KEY")}
    r = subprocess.run([sys.executable, "-m", "openrl", "autoresearch", str(study), "--data-dir", str(tmp_path / "none")],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "no stack: set TINKER_BASE_URL" in r.stderr
    r = autoresearch(study, "--proposer", "claude")
    assert r.returncode == 2 and "--proposer must be optuna or cmd:" in r.stderr
    assert not (study / "run" / "ledger.jsonl").exists()


def test_shipped_studies_parse():
    grpo = load_study(EXAMPLES / "async-grpo")
    assert grpo.metric.key == "reward/mean" and grpo.metric.goal == "maximize" and {p.name for p in grpo.params} == {"learning_rate", "loss", "max_staleness"}
    # The baseline is the committed params.json: the space's defaults are the recipe's defaults.
    committed = json.loads((EXAMPLES / "async-grpo" / "params.json").read_text())
    assert all(committed[k] == v for k, v in grpo.defaults().items())
    from openrl.recipes.async_grpo import Config

    assert grpo.defaults()["learning_rate"] == Config.learning_rate and grpo.defaults()["loss"] == Config.loss_fn
    sql = load_study(EXAMPLES / "text-to-sql")
    assert sql.metric.key == "heldout/accuracy" and "partial_credit" in {p.name for p in sql.params}
    committed = json.loads((EXAMPLES / "text-to-sql" / "params.json").read_text())
    assert all(committed[k] == v for k, v in sql.defaults().items())
    from openrl.recipes.sql_sweep import Experiment

    assert set(committed) - {"base_model"} <= {f for f in Experiment.__dataclass_fields__}


def test_read_metric_aggregates(tmp_path):
    from openrl.recipes.autoresearch.study import Metric

    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": i, "m": v}) + "\n" for i, v in enumerate([1.0, 5.0, 2.0, float("nan"), 3.0])))
    assert read_metric(f, Metric("m")) == 3.0
    assert read_metric(f, Metric("m", aggregate="mean", window=2)) == 2.5
    assert read_metric(f, Metric("m", aggregate="max")) == 5.0 and read_metric(f, Metric("m", aggregate="min")) == 1.0
    with pytest.raises(ValueError, match="no finite 'other'"):
        read_metric(f, Metric("other"))
    with pytest.raises(ValueError, match="wrote no metrics.jsonl"):
        read_metric(tmp_path / "metrics.jsonl.missing", Metric("m"))


# -- the harness on a toy attempt ----------------------------------------------------


def test_optuna_researchers_share_one_study_and_keep_only_improvements(tmp_path):
    study = toy_study(tmp_path / "toy", researchers=2, attempts=6)
    r = autoresearch(study)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "was not a git repository: initialised one" in r.stdout
    entries = ledger(study)
    assert len(entries) == 12 and sorted((e["researcher"], e["attempt"]) for e in entries) == [(i, n) for i in (0, 1) for n in range(6)]
    baseline = entries[0]
    assert baseline["status"] == "baseline" and baseline["params"] == {"x": 0.01, "n": 0, "kind": "a"} and baseline["metric"] == -13.0
    # No point asked twice: the researchers share the Optuna study (a running trial is known to the other).
    points = [json.dumps(e["params"], sort_keys=True) for e in entries]
    assert len(set(points)) == len(points)
    # Keep = beats the best judged so far (in ledger order); everything else is discarded.
    best = baseline["metric"]
    for e in entries[1:]:
        assert e["status"] in ("kept", "discarded") and e["error"] is None
        assert (e["status"] == "kept") == (e["metric"] > best), e
        best = max(best, e["metric"]) if e["status"] == "kept" else best
    kept = [e for e in entries if e["status"] == "kept"]
    assert kept and all(e["commit"] and '"x"' in e["diff"] for e in kept)
    # A kept attempt is a commit on its researcher's branch, holding its params and nothing the attempt wrote.
    for e in kept:
        assert json.loads(git(study, "show", f"{e['commit']}:params.json")) == e["params"]
        assert git(study, "show", "--name-only", "--format=", e["commit"]).split() == ["params.json"]
        assert e["commit"] in git(study, "rev-list", f"autoresearch/r{e['researcher']}")
    assert_worktrees_clean(study)
    # The attempt saw the stack and its params.
    seen = json.loads((Path(entries[1]["attempt_dir"]) / "env.json").read_text())
    assert seen["TINKER_BASE_URL"] == "http://127.0.0.1:9" and seen["TINKER_API_KEY"] == "tml-toy-secret"
    assert json.loads(seen["OPENRL_PARAMS"]) == entries[1]["params"]
    # The results: best.json is the best judged attempt, best.diff its change, results.md every attempt, a plot.
    run = study / "run"
    top = max((e for e in entries if e["status"] in ("baseline", "kept")), key=lambda e: e["metric"])
    best_json = json.loads((run / "best.json").read_text())
    assert best_json["metric"] == top["metric"] and best_json["params"] == top["params"] and best_json["baseline_metric"] == -13.0
    assert best_json["metric"] > -13.0
    diff = (run / "best.diff").read_text()
    assert "+++ b/params.json" in diff and f'"kind": "{top["params"]["kind"]}"' in diff
    table = (run / "results.md").read_text()
    assert table.count("\n| ") == 13 and "(best)" in table
    from PIL import Image

    with Image.open(run / "progress.png") as im:
        assert im.size == (720, 420)
    # Running again resumes: the ledger grows, attempts continue from where they were, Optuna remembers.
    r = autoresearch(study, "--attempts", "8")
    assert r.returncode == 0, r.stderr
    again = ledger(study)
    assert again[:12] == entries and len(again) == 16 and {e["attempt"] for e in again[12:]} == {6, 7}
    assert len({json.dumps(e["params"], sort_keys=True) for e in again}) == 16


AGENT = """\
import json, os, pathlib, sys
n = int(os.environ["OPENRL_ATTEMPT"])
plan = sys.argv[1].split(",")
action = plan[n - 1]
with open(os.environ["AGENT_LOG"], "a") as f:
    f.write(json.dumps({k: os.environ.get(k) for k in ("OPENRL_PROGRAM", "OPENRL_LEDGER", "OPENRL_EDITABLE", "OPENRL_EDITABLE_JSON",
                                                     "OPENRL_RESEARCHER", "OPENRL_ATTEMPT", "TINKER_API_KEY")}
                       | {"cwd": os.getcwd(), "ledger_lines": len(pathlib.Path(os.environ["OPENRL_LEDGER"]).read_text().splitlines()),
                          "program": pathlib.Path(os.environ["OPENRL_PROGRAM"]).read_text()}) + "\\n")
p = json.loads(pathlib.Path("params.json").read_text())
if action in ("fail", "hang"):
    p["mode"] = action
elif action == "better":
    p["x"] *= 10
elif action == "worse":
    p["x"] /= 10
elif action == "forbidden":
    p["x"] *= 10
    pathlib.Path("attempt.py").write_text(pathlib.Path("attempt.py").read_text() + "\\n# edited\\n")
elif action == "new-file":
    pathlib.Path("notes.txt").write_text("an agent's notes")
elif action == "exit":
    sys.exit(5)
pathlib.Path("params.json").write_text(json.dumps(p))
"""


def test_cmd_proposer_failures_overruns_and_forbidden_edits_are_discarded(tmp_path):
    """A scripted agent through --proposer cmd:'...', one action per attempt. The harness
    knows nothing of it: it runs it in the worktree, checks what it changed, runs and judges."""
    study = toy_study(tmp_path / "toy", budget=4, attempts=9)
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    plan = "fail,hang,forbidden,new-file,exit,better,worse,better"
    started = time.monotonic()
    r = autoresearch(study, "--proposer", f"cmd:python {agent} {plan}", env={"AGENT_LOG": str(tmp_path / "agent.log")})
    assert r.returncode == 0, r.stdout + r.stderr
    entries = ledger(study)
    assert [e["status"] for e in entries] == ["baseline", "failed", "overrun", "forbidden", "forbidden", "proposer-failed", "kept", "discarded", "kept"]
    assert "exited 3" in entries[1]["error"] and "budget of 4 s" in entries[2]["error"]
    assert "attempt.py" in entries[3]["error"] and "notes.txt" in entries[4]["error"] and "exited 5" in entries[5]["error"]
    assert 4 <= entries[2]["duration_s"] < 20 and time.monotonic() - started < 200
    # The overrun's whole process group is gone (its grandchild too).
    pids = [int(p) for p in (Path(entries[2]["attempt_dir"]) / "pids").read_text().split()]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), pids
    # The forbidden attempts never ran; the researcher went on; only the kept ones are commits.
    assert "attempt_dir" not in entries[3] and "attempt_dir" not in entries[4]
    assert [e["params"]["x"] for e in entries[6:]] == pytest.approx([0.1, 0.01, 1.0])
    assert entries[8]["metric"] == -9.0 and entries[6]["metric"] == -10.0
    log = git(study, "log", "--format=%s", "autoresearch/r0").splitlines()
    assert len(log) == 3 and log[0].startswith("autoresearch r0 attempt 8") and log[1].startswith("autoresearch r0 attempt 6")
    assert "# edited" not in git(study, "show", "autoresearch/r0:attempt.py")
    assert_worktrees_clean(study)
    # What the agent was handed: program.md, the ledger, the editable files, no key to the stack.
    seen = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
    assert len(seen) == 8
    for k, s in enumerate(seen, start=1):
        assert s["OPENRL_EDITABLE"] == "params.json" and json.loads(s["OPENRL_EDITABLE_JSON"]) == ["params.json"]
        assert s["program"] == "Maximise score.\n" and s["OPENRL_ATTEMPT"] == str(k) and s["TINKER_API_KEY"] is None
        assert Path(s["cwd"]) == study / "run" / "worktrees" / "r0" and s["ledger_lines"] == k  # the ledger so far
    best = json.loads((study / "run" / "best.json").read_text())
    assert best["attempt"] == 8 and best["params"]["x"] == pytest.approx(1.0)


def test_ctrl_c_stops_the_researchers_and_leaves_clean_worktrees(tmp_path):
    study = toy_study(tmp_path / "toy", budget=120, researchers=2, attempts=5, params={"x": 0.01, "n": 0, "kind": "a", "mode": "hang"})
    env = {**os.environ, "TINKER_BASE_URL": "http://127.0.0.1:9"}
    proc = subprocess.Popen([sys.executable, "-m", "openrl", "autoresearch", str(study)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)  # fmt: skip
    pid_files = [study / "run" / "attempts" / f"r{i}-0000" / "pids" for i in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "no attempts started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "SIGINT: stopping the researchers" in out
    for f in pid_files:
        for pid in map(int, f.read_text().split()):
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not alive(pid), pid
    entries = ledger(study)  # intact: every line is JSON
    assert sorted((e["researcher"], e["status"]) for e in entries) == [(0, "interrupted"), (1, "interrupted")]
    assert_worktrees_clean(study)
    assert (study / "run" / "results.md").exists()


# -- the shipped async-grpo study on a real stack -------------------------------------


def test_async_grpo_study_beats_the_default_configuration(stack, tmp_path):
    """The search against the default config, both measured by the same harness: attempt 0
    runs params.json as shipped (the recipe's defaults), then Optuna's proposals. Short:
    one researcher, 3 attempts of 6 steps."""
    study = tmp_path / "async-grpo"
    shutil.copytree(EXAMPLES / "async-grpo", study)
    params = json.loads((study / "params.json").read_text())
    (study / "params.json").write_text(json.dumps({**params, "steps": 6}, indent=1) + "\n")
    env = {"TINKER_BASE_URL": stack.url, "TINKER_API_KEY": stack.api_key}
    r = autoresearch(study, "--researchers", "1", "--attempts", "3", env=env, timeout=580)
    assert r.returncode == 0, r.stdout + r.stderr
    entries = ledger(study)
    assert [e["status"] for e in entries][0] == "baseline" and len(entries) == 3
    assert all(e["status"] in ("baseline", "kept", "discarded") for e in entries), [(e["status"], e["error"]) for e in entries]
    baseline = entries[0]
    assert baseline["params"]["learning_rate"] == 3e-4 and baseline["params"]["loss"] == "importance_sampling"
    best = json.loads((study / "run" / "best.json").read_text())
    assert best["status"] == "kept" and best["metric"] > baseline["metric"], textwrap.indent((study / "run" / "results.md").read_text(), "  ")
    # Each attempt trained its own LoRA model for the steps asked (rows of its metrics.jsonl).
    for e in entries:
        rows = [json.loads(line) for line in (Path(e["attempt_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(6))
        assert e["metric"] == pytest.approx(sum(row["reward/mean"] for row in rows[-3:]) / 3)
    assert "learning_rate" in (study / "run" / "best.diff").read_text()


def test_text_to_sql_attempt_runs_through_the_harness(stack, tmp_path):
    """The text-to-sql study's attempt (SFT, GRPO with the `sql` reward, held-out evaluation)
    on the default model, cut to a few steps: the baseline only. The default model does not
    learn SQL; this checks the attempt's plumbing, not its accuracy."""
    study = tmp_path / "text-to-sql"
    shutil.copytree(EXAMPLES / "text-to-sql", study)
    params = json.loads((study / "params.json").read_text())
    small = {"base_model": BASE_MODEL, "sft_steps": 2, "sft_batch": 4, "rl_steps": 1, "groups_per_step": 2, "max_tokens": 16}
    (study / "params.json").write_text(json.dumps({**params, **small}, indent=1) + "\n")
    env = {"TINKER_BASE_URL": stack.url, "TINKER_API_KEY": stack.api_key}
    r = autoresearch(study, "--researchers", "1", "--attempts", "1", env=env, timeout=580)
    assert r.returncode == 0, r.stdout + r.stderr
    (entry,) = ledger(study)
    assert entry["status"] == "baseline", (entry["error"], (Path(entry["attempt_dir"]) / "command.log").read_text()[-3000:])
    rows = [json.loads(line) for line in (Path(entry["attempt_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [row["phase"] for row in rows] == ["base", "sft", "rl"]
    assert all(0.0 <= row["heldout/accuracy"] <= row["heldout/executed"] <= 1.0 for row in rows)
    assert entry["metric"] == rows[-1]["heldout/accuracy"]
    rl = [json.loads(line) for line in (Path(entry["attempt_dir"]) / "rl" / "attempt" / "metrics.jsonl").read_text().splitlines()]
    assert len(rl) == 1 and "score/executed" in rl[0]  # scored by the sql reward workers

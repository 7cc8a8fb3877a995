"""`openrl up` explains itself and stops when told; `openrl down`, `openrl prepare MODEL`,
`openrl --version`, and OPENRL_* values that do not parse.

The stacks here are real `openrl up` processes on the offline default model, stopped while
they start (seconds): no test waits for a whole stack to be ready."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from openrl.supervisor import Child, CrashLoop, Supervisor, _signature
from stack_helpers import alive, free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def openrl(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openrl", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip


def start_up(data_dir: Path, *args: str) -> subprocess.Popen:
    log = open(data_dir.parent / f"{data_dir.name}-up.log", "wb")
    cmd = [sys.executable, "-m", "openrl", "up", "--data-dir", str(data_dir), "--port", str(free_port()), "--threads", "1", *args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def up_output(data_dir: Path) -> str:
    return (data_dir.parent / f"{data_dir.name}-up.log").read_text()


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def pids(data_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in (data_dir / "run").glob("*.pid") if p.read_text().strip()}


# -- the version and the distribution name ---------------------------------------------


def test_version_is_the_installed_distributions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "openrl-server"  # PyPI's `openrl` is another project
    assert project["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()
    out = openrl("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"openrl {project['version']} ("), out.stdout


# -- environment values ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value", "says"), [
    ("OPENRL_PORT", "abc", "OPENRL_PORT='abc' is not an integer"),
    ("OPENRL_SAMPLER_GPU_MEMORY_FRACTION", "half", "OPENRL_SAMPLER_GPU_MEMORY_FRACTION='half' is not a number"),
    ("OPENRL_PROTO_COMPRESS", "maybe", "OPENRL_PROTO_COMPRESS='maybe' is not a boolean"),
])  # fmt: skip
def test_an_environment_value_that_does_not_parse_is_named(tmp_path, name, value, says):
    out = openrl("down", "--data-dir", str(tmp_path), env={name: value})
    assert out.returncode != 0
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("yes", True), ("On", True), ("false", False),
                                                 ("0", False), ("no", False), ("", False)])  # fmt: skip
def test_boolean_variables_take_the_usual_spellings(monkeypatch, value, expected):
    from openrl.cli import parser

    monkeypatch.setenv("OPENRL_PROTO_COMPRESS", value)
    monkeypatch.setenv("OPENRL_ENFORCE_EAGER", value)
    assert parser().parse_args(["gateway"]).proto_compress is expected
    assert parser().parse_args(["sampler"]).enforce_eager is expected


# -- the supervisor's crash-loop detector ----------------------------------------------


def _child(tmp_path: Path, code: str) -> Child:
    return Child("worker", [sys.executable, "-c", code], grace_s=2)


def test_a_child_that_fails_the_same_way_every_start_stops_the_supervisor(tmp_path):
    console = open(tmp_path / "console.txt", "w+")
    code = "import sys; print('loading'); sys.exit('cannot find the model files')"
    sup = Supervisor(tmp_path, [_child(tmp_path, code)], crash_loop=3, console=console)
    sup.start_all()
    with pytest.raises(CrashLoop) as e:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sup.poll()
            time.sleep(0.05)
    assert e.value.role == "worker" and e.value.deaths == 3
    assert e.value.tail == ["loading", "cannot find the model files"]
    shown = (tmp_path / "console.txt").read_text()
    assert shown.count("cannot find the model files") == 1  # shown once, not at every restart
    assert "worker exited soon after starting" in shown


def test_a_child_that_fails_differently_each_time_is_restarted(tmp_path):
    console = open(tmp_path / "console.txt", "w+")
    code = "import sys, uuid; sys.exit('flaky ' + uuid.uuid4().hex)"
    child = _child(tmp_path, code)
    sup = Supervisor(tmp_path, [child], crash_loop=3, console=console)
    sup.start_all()
    deadline = time.monotonic() + 60
    while child.restarts < 4 and time.monotonic() < deadline:
        sup.poll()  # never CrashLoop: every error differs
        time.sleep(0.05)
    assert child.restarts >= 4
    sup.stop_all()


def test_a_json_log_lines_time_is_not_part_of_its_error():
    a = json.dumps({"event": "model_missing", "timestamp": "2026-12-07T00:00:01Z", "level": "error"})
    b = json.dumps({"event": "model_missing", "timestamp": "2026-12-07T00:00:09Z", "level": "error"})
    assert _signature(a) == _signature(b) != _signature(b.replace("missing", "found"))


# -- openrl up --------------------------------------------------------------------------


def test_up_with_a_model_it_cannot_have_says_so_before_starting_anything(tmp_path):
    data = tmp_path / "stack"
    started = time.monotonic()
    out = openrl("up", "--base-model", "Qwen/Qwen3-0.6B", "--data-dir", str(data), "--port", str(free_port()),
                 env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, timeout=60)  # fmt: skip
    assert out.returncode == 1
    assert "Qwen/Qwen3-0.6B is not in the Hugging Face cache" in out.stderr and "openrl prepare Qwen/Qwen3-0.6B" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 30
    assert not list((data / "logs").glob("*.log")) and not list((data / "run").iterdir())  # nothing started, nothing left


@pytest.mark.timeout(600)
def test_a_crash_loop_stops_the_stack_with_its_error(tmp_path, default_model):
    data = tmp_path / "stack"
    proc = start_up(data, "--rewarder", "broken=no_such_module:score")
    try:
        code = proc.wait(240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("openrl up kept restarting a child that fails at every start:\n" + up_output(data)[-3000:]) from None
    out = up_output(data)
    assert code == 1, out[-3000:]
    assert "rewarder-broken exited 3 times in a row" in out, out[-3000:]
    assert "No module named 'no_such_module'" in out
    assert not [role for role, pid in pids(data).items() if alive(pid)]
    assert not (data / "run" / "stack.json").exists() and not (data / "run" / "up.json").exists()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_startup_stops_the_stack(tmp_path, default_model, sig):
    data = tmp_path / "stack"
    proc = start_up(data)
    try:
        # The workers are starting (loading torch and the model): the stack is not ready yet.
        wait_for(lambda: {"trainer", "sampler", "gateway"} <= set(pids(data)), 120, "workers started")
        children = pids(data)
        assert not (data / "run" / "stack.json").exists()
        proc.send_signal(sig)
        code = proc.wait(45)  # the workers' grace is 15 s; one that is still importing dies at once
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"openrl up still running 45 s after {sig.name} during startup:\n" + up_output(data)[-3000:]) from None
    assert code == 0, up_output(data)[-3000:]
    assert "stack_stopping" in up_output(data)
    assert not [role for role, pid in children.items() if alive(pid)]


# -- openrl down --------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_down_stops_a_stack_started_elsewhere(tmp_path, default_model):
    data = tmp_path / "stack"
    proc = start_up(data)
    try:
        wait_for(lambda: {"trainer", "sampler", "gateway"} <= set(pids(data)) and (data / "run" / "up.json").exists(), 120,
                 "workers started")  # fmt: skip
        children = pids(data)
        out = openrl("down", "--data-dir", str(data), timeout=90)
        assert out.returncode == 0, out.stderr
        assert f"pid {proc.pid}" in out.stdout and "stopped" in out.stdout
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not [role for role, pid in children.items() if alive(pid)]
    assert not (data / "run" / "up.json").exists()


def test_down_without_a_stack_says_so(tmp_path):
    out = openrl("down", "--data-dir", str(tmp_path / "nothing"))
    assert out.returncode == 0 and out.stdout.startswith("no stack running in"), out


def test_down_with_a_stale_file_touches_no_other_process(tmp_path):
    bystander = subprocess.Popen(["sleep", "60"])  # the pid a stale file names now belongs to someone else
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / "stack.json").write_text(json.dumps({"pid": bystander.pid, "base_url": "http://127.0.0.1:1"}))
        (run / "trainer.pid").write_text(f"{bystander.pid}\n")
        out = openrl("down", "--data-dir", str(tmp_path))
        assert out.returncode == 0 and "no stack running" in out.stdout and "stale" in out.stdout, out
        assert bystander.poll() is None
        assert not (run / "stack.json").exists() and not (run / "trainer.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


# -- openrl prepare MODEL ----------------------------------------------------------------


def test_prepare_offline_without_the_model_cached_is_a_clear_error(tmp_path):
    out = openrl("prepare", "Qwen/Qwen3-0.6B", env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert "not in the Hugging Face cache" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_prepare_offline_finds_a_cached_model(tmp_path):
    """What a stack started offline relies on: a snapshot fetched earlier (laid out here as
    huggingface_hub lays it out) is found without the network."""
    repo = tmp_path / "hub" / "models--someorg--somemodel"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "tokenizer.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    out = openrl("prepare", "someorg/somemodel", env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert Path(facts["path"]) == snap and facts["files"] == ["config.json", "tokenizer.json"]


def test_up_shows_each_workers_loading_bar_from_its_log(tmp_path):
    """While workers load, `up` shows the progress bars their logs hold (tqdm writes them there
    with carriage returns even when not on a terminal, as transformers does for "Loading
    weights"), only what a child wrote since it started, and nothing for a child with no bar."""
    import types

    from tqdm import tqdm

    from openrl import cli

    trainer_log, sampler_log = tmp_path / "trainer.log", tmp_path / "sampler.log"
    sampler_log.write_text("Loading weights: 100%|##########| 46/46 [00:00<00:00]\n")  # a previous run's
    offset = sampler_log.stat().st_size
    with open(trainer_log, "w") as f:
        for _ in tqdm(range(46), desc="Loading weights", file=f, mininterval=0, ascii=True, total=46):
            if f.tell() and _ == 18:
                break
    children = [types.SimpleNamespace(role="trainer", log_offset=0), types.SimpleNamespace(role="sampler", log_offset=offset)]
    sup = types.SimpleNamespace(logs=tmp_path, children=children)
    assert cli._loading_progress(sup) == {"trainer": "Loading weights: 39% 18/46"}
    with open(sampler_log, "a") as f:
        f.write("\rLoading checkpoint shards:  60%|######    | 3/5 [00:09<00:06]")
    assert cli._loading_progress(sup)["sampler"] == "Loading checkpoint shards: 60% 3/5"

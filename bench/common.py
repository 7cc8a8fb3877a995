"""What the benchmarks share: a real `openrl up` stack in a subprocess, and the bus message a
forward_backward of random rows becomes (for in-process engine baselines)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

API_KEY = "tml-bench-key-0000000000"
PROCESS_KINDS = ("nats-server", "gateway", "trainer", "sampler", "rewarder")


def start_stack(data_dir: Path, *up_args: str, cwd: str | Path | None = None) -> tuple[subprocess.Popen, str]:
    """`openrl up` on a free port with its state under `data_dir`; returns (process, base URL).
    `cwd`: the source tree to run (`python -m` puts the working directory first on sys.path,
    before PYTHONPATH: a stack started from this repository runs this repository's `openrl`)."""
    from openrl.bus.server import free_port

    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "up.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "openrl", "up", "--data-dir", str(data_dir), "--port", str(free_port()), "--api-key", API_KEY,
         *up_args],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
    )  # fmt: skip
    stack_file = data_dir / "run" / "stack.json"
    deadline = time.monotonic() + 900
    while not stack_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_stack(proc)
            sys.exit(f"openrl up failed; see {data_dir}/up.log:\n{(data_dir / 'up.log').read_text()[-3000:]}")
        time.sleep(0.3)
    return proc, json.loads(stack_file.read_text())["base_url"]


def stop_stack(proc: subprocess.Popen) -> None:
    """SIGTERM, as Ctrl-C; the whole process group is killed if it does not stop in a minute."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def write_results(out: str | Path, results: dict, note: str = "") -> None:
    """The benchmark's figures as JSON at `out` (its folder made if needed), and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}{note}", flush=True)


def machine() -> dict:
    """The start of a run's "machine" record (`finish_results` adds the load average at the end)."""
    return {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def finish_results(out: str | Path, results: dict, args, started: float) -> None:
    """Close a run's results (load average at the end, seconds, the arguments) and write them."""
    results.setdefault("machine", {})["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    write_results(out, results, f" ({results['seconds']} s)")


def fb_message(model_id: str, rows: np.ndarray):
    """A cross_entropy forward_backward of `rows` (each L+1 tokens: inputs and shifted targets)."""
    from openrl.bus.messages import Datum, ForwardBackward, Tensor

    n = rows.shape[1] - 1
    data = [
        Datum(
            tokens=row[:-1].astype("<i4").tobytes(),
            loss_fn_inputs={
                "target_tokens": Tensor(dtype="int64", data=row[1:].astype("<i8").tobytes(), shape=[n]),
                "weights": Tensor(dtype="float32", data=np.ones(n, "<f4").tobytes(), shape=[n]),
            },
        )
        for row in rows
    ]
    return ForwardBackward(request_id="r", model_id=model_id, seq_id=1, loss_fn="cross_entropy", data=data)


# -- CPU-seconds per process of a stack


def stack_processes(root: int) -> dict[int, str]:
    """pid -> kind of `openrl up` (root) and every process under it, by its command line."""
    parent, cmd = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        out[pid] = "up" if pid == root else next((k for k in PROCESS_KINDS if k in cmd.get(pid, "")), "other")
        todo += [c for c, pp in parent.items() if pp == pid]
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_kind(procs: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = {"bench": cpu_seconds(os.getpid())}
    for pid, kind in procs.items():
        out[kind] = out.get(kind, 0.0) + cpu_seconds(pid)
    return out

"""Read a recipe's tracking back with the trackers' own readers: TensorBoard's
EventAccumulator for event files, and the records of a W&B offline run (`.wandb` file)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in the event files of `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_offline_run(run_dir: Path, timeout_s: float = 30.0) -> tuple[dict, dict, list[dict]]:
    """(run record: project/group/name, config, history rows) of a finished W&B offline run
    folder. `run.finish()` can return before W&B's writer process has written the last
    records: read again until the run's exit record is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _wandb_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    run, config, history = {}, {}, []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"project": record.run.project, "group": record.run.run_group, "name": record.run.display_name}
            config |= {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "config":
            config |= {u.key: json.loads(u.value_json) for u in record.config.update}
        elif kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): _number(i.value_json) for i in record.history.item})
    assert any(r.WhichOneof("record_type") == "exit" for r in records), f"{run_dir}: the run has no exit record"
    return run, config, history


def _wandb_records(run_dir: Path) -> list:
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (path,) = run_dir.glob("*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(path))
    records = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


def _number(value_json: str):
    return float("nan") if value_json == "NaN" else json.loads(value_json)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def assert_tracked_like_jsonl(rows: list[dict], tb_dir: Path | None, wandb_dir: Path | None) -> None:
    """Every numeric metric of every row of metrics.jsonl is in TensorBoard (as float32, at
    the row's step) and in the W&B run's history, and nothing else is."""
    metrics = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert metrics, rows
    if tb_dir is not None:
        tb = tensorboard_scalars(tb_dir)
        assert set(tb) == metrics, set(tb) ^ metrics
        for tag in metrics:
            want = [(r["step"], float(np.float32(r[tag]))) for r in rows if tag in r]
            got = tb[tag]
            assert [s for s, _ in got] == [s for s, _ in want] and all(same(g, w) for (_, g), (_, w) in zip(got, want)), tag
    if wandb_dir is not None:
        (run_dir,) = wandb_dir.glob("offline-run-*")
        _, _, history = wandb_offline_run(run_dir)
        assert [h["_step"] for h in history] == [r["step"] for r in rows]
        for h, r in zip(history, rows):
            logged = {k: v for k, v in h.items() if not k.startswith("_")}
            assert set(logged) == {k for k in r if k in metrics}
            assert all(same(float(v), float(r[k])) for k, v in logged.items()), (h, r)

"""The study's ledger: one JSON line per attempt, appended under a file lock and flushed to
disk line by line, so several researchers (threads, or harnesses in other processes) can
share it and a Ctrl-C or a crash never leaves half a line.

A line: {"researcher": 0, "attempt": 3, "status": "kept", "metric": 0.61, "params": {...},
"diff": "...", "commit": "ab12...", "duration_s": 41.2, "started": unix, "attempt_dir": "...",
"proposer": "optuna", "error": null}. Statuses: baseline (attempt 0 of researcher 0: the study
as committed), kept (beat the best so far: committed in the worktree), discarded (did not),
failed (the command exited non-zero, or left no metric), overrun (killed past the budget),
forbidden (the proposer changed a file outside `editable`), proposer-failed, interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from filelock import FileLock

# Statuses whose metric counts toward "the best so far".
JUDGED = ("baseline", "kept")


class Ledger:
    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file_lock = FileLock(str(path) + ".lock")
        self._lock = threading.Lock()  # FileLock is re-entrant per thread object; this orders threads

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, allow_nan=False, default=str) + "\n"
        with self._lock, self._file_lock:
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def entries(self) -> list[dict]:
        with self._lock, self._file_lock:
            return read(self.path)

    def judge_and_append(self, entry: dict, metric_better, decide) -> dict:
        """Atomically: read the best judged metric so far, let `decide(best)` set the entry's
        status (and commit), append it. Keeps two researchers from both keeping a result that
        only one of them beats."""
        with self._lock, self._file_lock:
            best = None
            for e in read(self.path):
                if e.get("status") in JUDGED and e.get("metric") is not None and metric_better(e["metric"], best):
                    best = e["metric"]
            entry = decide(entry, best)
            with open(self.path, "a") as f:
                f.write(json.dumps(entry, allow_nan=False, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return entry


def read(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]

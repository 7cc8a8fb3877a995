"""What a study leaves at the end, from its ledger: `results.md` (a markdown table of every
attempt, the best marked), `progress.png` (each attempt's metric and the best so far;
matplotlib, the `plots` extra, skipped with a message without it), `best.json` (the best
attempt's ledger entry, its params and how it compares with the baseline) and `best.diff`
(its change to the study, from the commit the researchers started at)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from openrl.recipes.autoresearch.ledger import JUDGED, read
from openrl.recipes.autoresearch.study import Study


def best_entry(study: Study, entries: list[dict]) -> dict | None:
    best = None
    for e in entries:
        if e.get("status") in JUDGED and e.get("metric") is not None and (best is None or study.metric.better(e["metric"], best["metric"])):
            best = e
    return best


def table(study: Study, entries: list[dict]) -> str:
    best = best_entry(study, entries)
    # The searched parameters, and any other that some attempt changed (an agent may edit more).
    declared = {p.name for p in study.params}
    seen: dict[str, set[str]] = {}
    for e in entries:
        for k, v in (e.get("params") or {}).items():
            seen.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    names = sorted(k for k, values in seen.items() if k in declared or len(values) > 1)
    head = ["#", "researcher", "attempt", "status", study.metric.key, "seconds", *names, "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, e in enumerate(entries):
        metric = f"{e['metric']:.4f}" if e.get("metric") is not None else "-"
        if e is best:
            metric = f"**{metric}** (best)"
        params = e.get("params") or {}
        row = [str(k), f"r{e['researcher']}", str(e["attempt"]), e["status"], metric, f"{e.get('duration_s', 0):.0f}",
               *(_fmt(params.get(n)) for n in names), (e.get("commit") or "")[:10]]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write(study: Study, run_dir: Path, say=print) -> dict | None:
    """Write results.md, progress.png, best.json and best.diff; returns the best entry."""
    entries = read(run_dir / "ledger.jsonl")
    best = best_entry(study, entries)
    baseline = next((e for e in entries if e.get("status") == "baseline"), None)
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = [f"# {study.name}: {len(entries)} attempts ({summary})", "",
             f"Metric: `{study.metric.key}` ({study.metric.aggregate}{f' of the last {study.metric.window}' if study.metric.window else ''}), "
             f"{study.metric.goal}d.", ""]  # fmt: skip
    if best is not None:
        lines += [f"Best: researcher {best['researcher']} attempt {best['attempt']} ({best['status']}), "
                  f"{study.metric.key} = {best['metric']:.4f}" + (f" against the baseline's {baseline['metric']:.4f}" if baseline and baseline.get("metric") is not None else "")
                  + ": best.json, best.diff", ""]  # fmt: skip
    (run_dir / "results.md").write_text("\n".join(lines) + table(study, entries) + "\n")
    if best is not None:
        base = (run_dir / "base_commit").read_text().strip() if (run_dir / "base_commit").exists() else None
        diff = ""
        if base and best.get("commit"):
            diff = subprocess.run(["git", "diff", base, best["commit"]], cwd=study.dir, capture_output=True, text=True).stdout
        (run_dir / "best.diff").write_text(diff)
        out = {"metric_key": study.metric.key, "goal": study.metric.goal, "metric": best["metric"], "params": best.get("params", {}),
               "commit": best.get("commit"), "researcher": best["researcher"], "attempt": best["attempt"], "status": best["status"],
               "baseline_metric": baseline.get("metric") if baseline else None, "entry": best}  # fmt: skip
        (run_dir / "best.json").write_text(json.dumps(out, indent=1) + "\n")
    try:
        from openrl.recipes.plot import PlotsUnavailable, line_chart

        points = [(k, e["metric"]) for k, e in enumerate(entries) if e.get("metric") is not None]
        running, best_so_far = [], None
        for k, e in enumerate(entries):
            if e.get("status") in JUDGED and e.get("metric") is not None and study.metric.better(e["metric"], best_so_far):
                best_so_far = e["metric"]
            if best_so_far is not None:
                running.append((k, best_so_far))
        line_chart(run_dir / "progress.png", {"attempt": points, "best so far": running}, title=f"{study.name}: {study.metric.key}",
                   x_label="attempt (ledger order)", y_label=study.metric.key)  # fmt: skip
    except PlotsUnavailable as e:
        say(f"no progress.png: {e}")
    return best

"""A study folder's `study.toml`, read with tomllib into typed settings; every missing or
wrong field is named before anything runs.

    [study]
    command = "python attempt.py"      # one attempt, run in the researcher's worktree
    budget_s = 300                     # an attempt's wall-clock budget (its process group is killed past it)
    researchers = 2                    # at once, each in its own git worktree
    attempts = 10                      # per researcher, the baseline included
    editable = ["params.json"]         # what a `cmd:` proposer (an agent) may change
    params_file = "params.json"        # where the parameters live (JSON, in the worktree)
    seed = 0                           # the Optuna sampler's
    proposer_budget_s = 900            # a `cmd:` proposer's wall-clock budget

    [metric]
    key = "reward/mean"                # a key of the rows of metrics.jsonl in the attempt dir
    goal = "maximize"                  # or "minimize"
    aggregate = "mean"                 # last | mean | max | min, over the last `window` rows
    window = 3                         # (all rows when left out)

    [params.learning_rate]             # the space Optuna searches (and its defaults: the baseline)
    type = "float"
    low = 1e-4
    high = 3e-2
    log = true
    default = 3e-4
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AGGREGATES = ("last", "mean", "max", "min")
GOALS = ("maximize", "minimize")


class StudyError(ValueError):
    """study.toml is missing, unreadable, or has a missing or wrong field (named in the message)."""


@dataclass(frozen=True)
class Param:
    """One dimension of the search space."""

    name: str
    type: str  # float | int | categorical
    default: Any
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if self.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            return False
        if self.type == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
            return False
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Metric:
    key: str
    goal: str = "maximize"
    aggregate: str = "last"
    window: int | None = None

    def better(self, a: float, b: float | None) -> bool:
        """`a` beats `b` (None: nothing yet) strictly."""
        if b is None:
            return True
        return a > b if self.goal == "maximize" else a < b


@dataclass(frozen=True)
class Study:
    dir: Path
    name: str
    command: str
    budget_s: float
    researchers: int
    attempts: int
    editable: tuple[str, ...]
    params_file: str
    metric: Metric
    params: tuple[Param, ...]
    seed: int = 0
    proposer_budget_s: float = 900.0

    @property
    def program(self) -> Path:
        return self.dir / "program.md"

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


def _get(table: dict, key: str, where: str, types: type | tuple, *, required: bool = True, default: Any = None) -> Any:
    if key not in table:
        if required:
            raise StudyError(f"study.toml: {where}.{key} is missing")
        return default
    value = table[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise StudyError(f"study.toml: {where}.{key} must be {_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise StudyError(f"study.toml: {where}.{key} must be {_names(types)}, got {value!r}")
    return value


def _names(types: type | tuple) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _unknown(table: dict, known: set[str], where: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise StudyError(f"study.toml: {where} has unknown field(s) {', '.join(extra)} (known: {', '.join(sorted(known))})")


def _param(name: str, t: Any) -> Param:
    where = f"params.{name}"
    if not isinstance(t, dict):
        raise StudyError(f"study.toml: {where} must be a table ([{where}] with type, default, ...)")
    kind = _get(t, "type", where, str)
    if kind == "categorical":
        _unknown(t, {"type", "choices", "default"}, where)
        choices = _get(t, "choices", where, list)
        if not choices or not all(isinstance(c, (str, int, float, bool)) for c in choices):
            raise StudyError(f"study.toml: {where}.choices must be a non-empty list of strings or numbers")
        default = t.get("default", choices[0])
        if default not in choices:
            raise StudyError(f"study.toml: {where}.default {default!r} is not one of its choices {choices}")
        return Param(name, kind, default, choices=tuple(choices))
    if kind not in ("float", "int"):
        raise StudyError(f"study.toml: {where}.type must be float, int or categorical, got {kind!r}")
    _unknown(t, {"type", "low", "high", "log", "step", "default"}, where)
    num = int if kind == "int" else (int, float)
    low, high = _get(t, "low", where, num), _get(t, "high", where, num)
    log = _get(t, "log", where, bool, required=False, default=False)
    step = _get(t, "step", where, num, required=False)
    if not low < high:
        raise StudyError(f"study.toml: {where} needs low < high, got low={low} high={high}")
    if log and low <= 0:
        raise StudyError(f"study.toml: {where}.low must be > 0 with log = true, got {low}")
    if log and step is not None:
        raise StudyError(f"study.toml: {where} takes step or log = true, not both")
    default = _get(t, "default", where, num)
    p = Param(name, kind, float(default) if kind == "float" else default, low=low, high=high, log=log, step=step)
    if not p.contains(p.default):
        raise StudyError(f"study.toml: {where}.default {default} is outside [{low}, {high}]")
    return p


def load_study(study_dir: str | Path) -> Study:
    """Read and check `<study_dir>/study.toml` (and that program.md is there)."""
    study_dir = Path(study_dir).resolve()
    path = study_dir / "study.toml"
    if not study_dir.is_dir():
        raise StudyError(f"{study_dir} is not a folder (a study is a folder with study.toml and program.md)")
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{path} is missing") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StudyError(f"{path} is not valid TOML: {e}") from None
    if not (study_dir / "program.md").is_file():
        raise StudyError(f"{study_dir / 'program.md'} is missing (what to improve, written for an agent)")
    _unknown(raw, {"study", "metric", "params"}, "the top level")
    s = _get(raw, "study", "study.toml", dict) if "study" in raw else None
    if s is None:
        raise StudyError("study.toml: the [study] table is missing")
    _unknown(s, {"name", "command", "budget_s", "researchers", "attempts", "editable", "params_file", "seed", "proposer_budget_s"}, "study")
    command = _get(s, "command", "study", str)
    if not command.strip():
        raise StudyError("study.toml: study.command is empty")
    budget_s = _get(s, "budget_s", "study", (int, float))
    researchers = _get(s, "researchers", "study", int, required=False, default=1)
    attempts = _get(s, "attempts", "study", int, required=False, default=10)
    params_file = _get(s, "params_file", "study", str, required=False, default="params.json")
    editable = _get(s, "editable", "study", list, required=False, default=[params_file])
    seed = _get(s, "seed", "study", int, required=False, default=0)
    proposer_budget_s = _get(s, "proposer_budget_s", "study", (int, float), required=False, default=900)
    for name, value, low in (("budget_s", budget_s, 0), ("researchers", researchers, 1), ("attempts", attempts, 1),
                             ("proposer_budget_s", proposer_budget_s, 0)):  # fmt: skip
        if value < low or (low == 0 and value == 0):
            raise StudyError(f"study.toml: study.{name} must be {'>= 1' if low else '> 0'}, got {value}")
    for f in editable:
        if not isinstance(f, str) or not f or Path(f).is_absolute() or ".." in Path(f).parts:
            raise StudyError(f"study.toml: study.editable must list paths inside the study, got {f!r}")
    m = _get(raw, "metric", "study.toml", dict) if "metric" in raw else None
    if m is None:
        raise StudyError("study.toml: the [metric] table is missing")
    _unknown(m, {"key", "goal", "aggregate", "window"}, "metric")
    metric = Metric(key=_get(m, "key", "metric", str), goal=_get(m, "goal", "metric", str, required=False, default="maximize"),
                    aggregate=_get(m, "aggregate", "metric", str, required=False, default="last"),
                    window=_get(m, "window", "metric", int, required=False))  # fmt: skip
    if metric.goal not in GOALS:
        raise StudyError(f"study.toml: metric.goal must be maximize or minimize, got {metric.goal!r}")
    if metric.aggregate not in AGGREGATES:
        raise StudyError(f"study.toml: metric.aggregate must be one of {', '.join(AGGREGATES)}, got {metric.aggregate!r}")
    if metric.window is not None and metric.window < 1:
        raise StudyError(f"study.toml: metric.window must be >= 1, got {metric.window}")
    p = raw.get("params", {})
    if not isinstance(p, dict):
        raise StudyError("study.toml: params must be tables ([params.NAME])")
    params = tuple(_param(name, t) for name, t in p.items())
    name = _get(s, "name", "study", str, required=False, default=study_dir.name)
    return Study(dir=study_dir, name=name, command=command, budget_s=float(budget_s), researchers=researchers, attempts=attempts,
                 editable=tuple(editable), params_file=params_file, metric=metric, params=params, seed=seed,
                 proposer_budget_s=float(proposer_budget_s))  # fmt: skip


def read_metric(metrics_file: Path, metric: Metric) -> float:
    """The metric of an attempt from its metrics.jsonl; ValueError saying why there is none."""
    try:
        lines = metrics_file.read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"the attempt wrote no {metrics_file.name}") from None
    values = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{metrics_file.name} line {i + 1} is not JSON") from None
        v = row.get(metric.key) if isinstance(row, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            values.append(float(v))
    if not values:
        raise ValueError(f"{metrics_file.name} has no finite {metric.key!r}")
    if metric.window is not None:
        values = values[-metric.window :]
    match metric.aggregate:
        case "last":
            return values[-1]
        case "mean":
            return sum(values) / len(values)
        case "max":
            return max(values)
        case _:
            return min(values)

"""Where a recipe's per-step metrics go: `<log_dir>/metrics.jsonl` and the reward chart,
and, when asked, Weights & Biases (`--wandb-project`) and TensorBoard (`--tensorboard-dir`)
through those libraries' own APIs (the optional `tracking` extra).

    tracking = Tracking(wandb_project="openrl-grpo", tensorboard_dir=Path("runs/tb"))
    log = MetricsLog(Path("runs/async-grpo"), "reward", name="async-grpo", config={...}, tracking=tracking)
    log.append({"step": 0, "reward/mean": 0.31, ...})   # one line of metrics.jsonl, one W&B step, TB scalars
    log.close()                                          # the chart; the trackers finish (or `with MetricsLog(...)`)

W&B runs offline with `WANDB_MODE=offline` (no account, no network): the run is written under
`<log_dir>/wandb/offline-run-*` for `wandb sync` later. Each step's numeric metrics are logged
under their own slash-namespaced names at the row's `step`, as in metrics.jsonl.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Never sent to a tracker: it is a credential.
SECRET_FIELDS = ("api_key",)


class TrackingUnavailable(ImportError):
    """wandb or tensorboard is asked for and not installed."""


def _extra_hint(package: str) -> str:
    from importlib.metadata import packages_distributions

    dist = (packages_distributions().get("openrl") or ["openrl"])[0]
    return f"{package} is not installed: pip install '{dist}[tracking]' (or pip install {package})"


@dataclass(frozen=True)
class Tracking:
    """Which trackers a run logs to besides metrics.jsonl."""

    wandb_project: str | None = None
    wandb_group: str | None = None  # a sweep's experiments share one
    tensorboard_dir: Path | None = None  # the run's event files go right here (SummaryWriter's log_dir)

    def check(self) -> None:
        """Raise TrackingUnavailable, naming the extra, before any work, if a tracker asked for is missing."""
        if self.wandb_project:
            try:
                import wandb  # noqa: F401
            except ImportError as e:
                raise TrackingUnavailable(_extra_hint("wandb")) from e
        if self.tensorboard_dir is not None:
            try:
                import tensorboard  # noqa: F401
            except ImportError as e:
                raise TrackingUnavailable(_extra_hint("tensorboard")) from e

    def for_run(self, name: str) -> Tracking:
        """The tracking of one of several runs (a sweep's experiment): its own TensorBoard subfolder."""
        tb = self.tensorboard_dir / name if self.tensorboard_dir is not None else None
        return Tracking(wandb_project=self.wandb_project, wandb_group=self.wandb_group, tensorboard_dir=tb)


def scalars(row: dict) -> dict[str, float]:
    """The numeric metrics of a row, `step` left out (it is the x axis)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsLog:
    """Per-step metrics: kept in memory, appended to `<log_dir>/metrics.jsonl`, logged to the
    trackers of `tracking`, drawn as `<log_dir>/reward.png` by `plot()`."""

    def __init__(self, log_dir: Path | None, title: str, *, name: str = "run", config: dict[str, Any] | None = None,
                 tracking: Tracking = Tracking(), plots: bool = True):  # fmt: skip
        self.rows: list[dict] = []
        self.log_dir, self.title, self.plots = log_dir, title, plots and log_dir is not None
        if self.plots:
            from openrl.recipes.plot import require_matplotlib

            require_matplotlib()  # now, not after the run
        tracking.check()
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / "metrics.jsonl").write_text("")
        config = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                  for k, v in (config or {}).items() if k not in SECRET_FIELDS}  # fmt: skip
        self.wandb_run = self.tensorboard = None
        if tracking.wandb_project:
            self.wandb_run = _wandb_run(tracking, name, config, log_dir)
        if tracking.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(tracking.tensorboard_dir))
            self.tensorboard.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.log_dir is not None:
            with open(self.log_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row, allow_nan=True) + "\n")
        values = scalars(row)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=row["step"])
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, row["step"])
            self.tensorboard.flush()  # a step is seconds apart: what is logged is on disk

    def plot(self) -> Path | None:
        if not self.plots or not self.rows:
            return None
        from openrl.recipes.plot import line_chart

        reward = [(r["step"], r["reward/mean"]) for r in self.rows]
        window = 5  # a moving average makes the trend readable through the per-step noise
        smooth = [(r["step"], _mean([v for _, v in reward[max(0, i - window + 1) : i + 1]])) for i, r in enumerate(self.rows)]
        return line_chart(self.log_dir / "reward.png", {"reward/mean": reward, f"mean of last {window}": smooth},
                          title=self.title, x_label="step", y_label="reward")  # fmt: skip

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    def close(self, ok: bool = True) -> None:
        """Draw the chart and close the trackers (a W&B run is marked failed unless `ok`)."""
        try:
            self.plot()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.wandb_run is not None:
                self.wandb_run.finish(exit_code=0 if ok else 1)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _wandb_run(tracking: Tracking, name: str, config: dict, log_dir: Path | None):
    import wandb

    try:
        # create_new: a sweep's experiments are several runs open at once in this process.
        return wandb.init(project=tracking.wandb_project, group=tracking.wandb_group, name=name, config=config,
                          dir=str(log_dir) if log_dir is not None else None, reinit="create_new")  # fmt: skip
    except Exception as e:
        raise RuntimeError(
            f"W&B run for project {tracking.wandb_project!r} could not start ({type(e).__name__}: {e}); "
            "log in (`wandb login` or WANDB_API_KEY), or set WANDB_MODE=offline to log locally without a network"
        ) from e

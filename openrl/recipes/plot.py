"""The recipes' line charts, drawn with matplotlib (the optional `plots` extra).

    line_chart("reward.png", {"reward/mean": [(0, 0.8), (1, 0.85), ...]}, title="async GRPO",
               x_label="step", y_label="reward")

matplotlib is imported when a chart is drawn, not with this module, and only through its
object API (`Figure`, no pyplot): no GUI backend, no global figure state shared between the
concurrent experiments of a sweep.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

# One colour per series, in this order (matplotlib's tab10 palette, red second).
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DPI = 100


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise PlotsUnavailable, naming the extra to install, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        from importlib.metadata import packages_distributions

        dist = (packages_distributions().get("openrl") or ["openrl"])[0]
        raise PlotsUnavailable(
            f"the charts need matplotlib, which is not installed: pip install '{dist}[plots]' (or pip install matplotlib)"
        ) from e


def line_chart(path: str | Path, series: Mapping[str, Sequence[tuple[float, float]]], *, title: str = "", x_label: str = "",
               y_label: str = "", y_range: tuple[float, float] | None = None, x_ticks: Sequence[float] | None = None,
               width: int = 720, height: int = 420) -> Path:  # fmt: skip
    """Write a PNG of `width` x `height` pixels with one line per series (points are (x, y);
    NaN and None points are skipped)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, pts) in enumerate(series.items()):
        kept = [(float(x), float(y)) for x, y in pts if y is not None and math.isfinite(y)]
        ax.plot([x for x, _ in kept], [y for _, y in kept], color=COLORS[i % len(COLORS)], linewidth=2, marker="o", markersize=4, label=name)
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if y_range is not None:
        ax.set_ylim(*y_range)
    if x_ticks is not None:
        ax.set_xticks(list(x_ticks))
    ax.grid(True, color="#e1e1e1")
    if series:
        ax.legend(loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path

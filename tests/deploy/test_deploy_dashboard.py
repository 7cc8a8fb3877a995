"""deploy/grafana/openrl-dashboard.json: it parses, every query names series and labels the
code exports (openrl/metrics.py), and every exported series is on some panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "openrl-dashboard.json"
SERIES = re.compile(r"\bopenrl_[a-z_]+\b")
# PromQL words that are not label names, inside by (...) / {...}
SELECTOR = re.compile(r"(openrl_[a-z_]+)\{([^}]*)\}")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def base_metric(name: str):
    from openrl import metrics

    for suffix in ("", "_bucket", "_sum", "_count"):
        m = metrics.REGISTRY.metrics.get(name.removesuffix(suffix) if suffix else name)
        if m is not None and (not suffix or isinstance(m, metrics.Histogram)):
            return m
    return None


def test_dashboard_parses_and_has_panels_with_queries():
    d = dashboard()
    assert d["title"] and d["uid"] and d["panels"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]


def test_every_query_names_series_and_labels_the_code_exports():
    from openrl import metrics

    exported = metrics.series_names()
    for expr in exprs():
        names = SERIES.findall(expr)
        assert names, f"no openrl series in {expr!r}"
        for name in names:
            assert name in exported, f"{name} (in {expr!r}) is not exported by openrl/metrics.py"
        for name, selector in SELECTOR.findall(expr):
            m = base_metric(name)
            labels = set(m.label_names) | ({"le"} if name.endswith("_bucket") else set())
            for label in re.findall(r"([a-zA-Z_]+)\s*(?:=~|!=|!~|=)", selector):
                assert label in labels, f"{name} has no label {label!r} ({expr!r})"
        grouped = {name for name in names}
        for group in BY.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert any(label in base_metric(n).label_names or (label == "le" and n.endswith("_bucket")) for n in grouped), (
                    f"no series in {expr!r} has label {label!r}"
                )


def test_every_exported_series_is_on_a_panel():
    from openrl import metrics

    used = {n for e in exprs() for n in SERIES.findall(e)}
    used_base = {base_metric(n).name for n in used}
    missing = set(metrics.SERIES) - used_base
    assert not missing, f"series with no panel: {sorted(missing)}"

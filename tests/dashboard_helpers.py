"""The Grafana dashboard as the tests read it: its PromQL queries and the metric and label
names they use, and the metric names the worker exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import Histogram

from streamproc.align.aligner import OutcomeStatus
from streamproc.worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamproc-worker.json"

# PromQL that is not a metric name: grouping clauses, range selectors, label matchers
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_NOT_NAMES = re.compile(r"\[[^\]]*\]|\{[^}]*\}|\"[^\"]*\"|\b\d+(?:\.\d+)?\b")
_IDENT = re.compile(r"[A-Za-z_:][\w:]*")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict | None = None) -> list[str]:
    """Every PromQL expression of every panel."""
    dash = dash or dashboard()
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (identifiers that are not functions, keywords or
    grouping labels)."""
    bare = _NOT_NAMES.sub(" ", _GROUPING.sub(" ", expr))
    names = set()
    for m in _IDENT.finditer(bare):
        rest = bare[m.end():].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        names.add(m.group())
    return names


def grouping_labels(expr: str) -> dict[str, set[str]]:
    """metric name -> labels an aggregation over it groups by (``sum by (kind) (m)``)."""
    out: dict[str, set[str]] = {}
    for m in _GROUPING.finditer(expr):
        labels = {x.strip() for x in m.group(1).split(",") if x.strip()}
        for name in metric_names(expr[m.end():]):
            out.setdefault(name, set()).update(labels)
            break  # the metric right after the clause is the one it groups
    return out


def registry_names() -> set[str]:
    """Sample names of the worker's histograms and gauges (its registry's own families)."""
    names = set()
    for fam in Metrics().registry.collect():
        if fam.type == "histogram":
            names |= {f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count"}
        elif fam.type == "gauge":
            names.add(fam.name)
    assert any(isinstance(c, Histogram) for c in vars(Metrics()).values())
    return names


def counter_names() -> set[str]:
    """``streamproc_<name>_total`` for every counter the worker code counts: the names it
    passes to ``counters.inc`` (a literal, either literal of a conditional, or an aligner
    outcome, which the worker counts under its status)."""
    names: set[str] = set()
    for path in (ROOT / "streamproc").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"counters\.inc\(", text):
            depth, i = 0, m.end()
            while i < len(text) and not (depth == 0 and text[i] in ",)"):
                depth += text[i] in "([{"
                depth -= text[i] in ")]}"
                i += 1
            first = text[m.end():i]
            literals = re.findall(r"\"(\w+)\"", first)
            if literals:
                names.update(literals)
            elif first.strip() == "status":
                names.update(s.value for s in OutcomeStatus)
    return {f"streamproc_{n}_total" for n in names}

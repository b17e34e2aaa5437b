"""The Grafana dashboard's PromQL, outside Grafana: extract each panel's queries and run them
against a Prometheus (HTTP API). Used by the dashboard test and deploy/grafana/render_panels.py."""

from __future__ import annotations

import json
import math
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "archsync.json"
DEFAULT_PROMETHEUS = "http://127.0.0.1:9090"


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str
    legend: str


def panel_queries(dashboard: dict[str, Any]) -> Iterator[PanelQuery]:
    """Every (panel, target) with a PromQL expression, rows' nested panels included."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for panel in walk(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield PanelQuery(
                    panel.get("title", ""), target.get("refId", ""), target["expr"], target.get("legendFormat", "")
                )


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def substitute(expr: str, rate_interval: str = "30s", interval: str = "15s", range_: str = "1h") -> str:
    """Replace Grafana's built-in variables with fixed values."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("${__rate_interval}", rate_interval)
        .replace("$__interval", interval)
        .replace("$__range", range_)
    )


class Prometheus:
    """A minimal client of the Prometheus HTTP API."""

    def __init__(self, url: str = DEFAULT_PROMETHEUS, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=self.timeout) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"{path}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector: [{metric: {...}, value: [ts, "v"]}]."""
        data = self._get("/api/v1/query", query=expr)
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float | None = None, step: float = 5.0) -> list[dict[str, Any]]:
        """Range vector: [{metric: {...}, values: [[ts, "v"], …]}]."""
        end = end if end is not None else time.time()
        data = self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)
        return list(data["result"])


def has_data(series: list[dict[str, Any]]) -> bool:
    """True when a range result has at least one finite sample (what a panel would draw)."""
    for s in series:
        for _, value in s.get("values", []):
            if math.isfinite(float(value)):
                return True
    return False

"""Render the key panels of deploy/grafana/dashboards/archsync.json to a PNG, from the same PromQL,
against a real Prometheus (Grafana has no package here). Used for the README's picture:

    make services
    .venv/bin/archsync demo --forms 40 --metrics-port 9401 --worker-metrics-port 9403
    .venv/bin/python deploy/grafana/render_panels.py --minutes 5 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from archsync.dashboards import DEFAULT_PROMETHEUS, Prometheus, load_dashboard, panel_queries, substitute  # noqa: E402

KEY_PANELS = (
    "Captured events / s",
    "Applied commands / s",
    "End-to-end latency (source commit → target commit)",
    "Per-flow latency p99",
    "Replication slot lag",
    "Consumer lag by topic",
    "Dead letters waiting (not re-driven)",
    "Audit events / s by kind",
)


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def render(prometheus: Prometheus, start: float, end: float, out: Path, step: float, rate_interval: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    dashboard = load_dashboard()
    by_panel: dict[str, list[Any]] = {}
    units: dict[str, str] = {}
    for panel in dashboard["panels"]:
        units[panel.get("title", "")] = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    for q in panel_queries(dashboard):
        if q.panel in KEY_PANELS:
            by_panel.setdefault(q.panel, []).append(q)
    titles = [t for t in KEY_PANELS if t in by_panel]
    cols = 2
    rows = (len(titles) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.1 * rows), squeeze=False)
    drawn = 0
    for ax, title in zip(axes.flat, titles, strict=False):
        for q in by_panel[title]:
            for s in prometheus.query_range(substitute(q.expr, rate_interval=rate_interval), start, end, step):
                xs = [datetime.fromtimestamp(float(t)) for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                unit = units.get(title, "")
                if unit == "s":
                    ys = [y * 1000 for y in ys]
                ax.plot(xs, ys, linewidth=1.2, label=legend(q.legend, s["metric"]))
                drawn += 1
        unit = {"s": "ms", "ops": "per second", "bytes": "bytes"}.get(units.get(title, ""), "")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel(unit, fontsize=8)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(titles) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"archsync pipeline — key panels of the Grafana dashboard, {datetime.fromtimestamp(start):%Y-%m-%d %H:%M}"
        f"–{datetime.fromtimestamp(end):%H:%M}",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default=DEFAULT_PROMETHEUS)
    parser.add_argument("--minutes", type=float, default=10.0, help="Window ending now (default 10).")
    parser.add_argument("--end", type=float, default=None, help="Window end (unix time; default now).")
    parser.add_argument("--step", type=float, default=5.0)
    parser.add_argument("--rate-interval", default="30s", help="Value of $__rate_interval (default 30s).")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    args = parser.parse_args(argv)
    end = args.end or time.time()
    drawn = render(Prometheus(args.prometheus), end - args.minutes * 60, end, args.out, args.step, args.rate_interval)
    print(f"{args.out}: {drawn} series drawn")
    return 0 if drawn else 1


if __name__ == "__main__":
    raise SystemExit(main())

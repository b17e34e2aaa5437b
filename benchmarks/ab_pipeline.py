"""Compare two revisions of the pipeline in turns: A, B, A, B, … on the same services.

This VM's speed drifts by ±25% between runs (sometimes within minutes), so a single run of each
revision compares the machine, not the code. Here each revision gets a git worktree of its own
(sharing this tree's virtualenv), and each round runs A then B with a fresh pipeline: captures, one
worker, a 200-form warm-up, then the phases. ``--setup-a`` / ``--setup-b`` run a side otherwise:
``audit=separate`` (the audit agent in a worker of its own), ``audit=off``, ``workers=2`` (two workers
sharing the partitions) — so one revision can be compared with itself in two setups.

    python -m benchmarks.ab_pipeline 45eaca5 HEAD --rounds 3 --phases steady:1000:20,burst:3000

A revision is anything ``git rev-parse`` knows, or ``WORKTREE`` for this tree as it is (uncommitted
changes included). Phases, in order: ``steady:<row changes/s>:<seconds>`` (latency percentiles of
OA approval → archive item) and ``burst:<forms>`` (the rate a burst drains at). For each run: the
latency or rate, CPU ms per OA row change by process group, and the machine's steal. Results:
benchmarks/results/ab_pipeline.json, and a table on stdout. Never run it beside another pipeline
(tests, benchmarks): they share the cores it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORKTREE = "WORKTREE"
WARM_UP_FORMS = 200


@dataclass(frozen=True)
class Phase:
    kind: str  # "steady" or "burst"
    rate: int = 0  # steady: row changes/s
    seconds: float = 0.0  # steady: how long
    forms: int = 0  # burst: forms written at once

    @property
    def name(self) -> str:
        return f"steady:{self.rate}:{self.seconds:g}" if self.kind == "steady" else f"burst:{self.forms}"


def parse_phases(text: str) -> list[Phase]:
    """``steady:1000:20,burst:3000`` → phases; a clear error for anything else. A steady phase
    after a burst is refused: the steady phase numbers its forms from 0, as in bench_pipeline."""
    phases: list[Phase] = []
    for part in (p.strip() for p in text.split(",")):
        bits = part.split(":")
        try:
            if bits[0] == "steady" and len(bits) == 3:
                phase = Phase("steady", rate=int(bits[1]), seconds=float(bits[2]))
                ok = phase.rate > 0 and phase.seconds > 0
            elif bits[0] == "burst" and len(bits) == 2:
                phase = Phase("burst", forms=int(bits[1]))
                ok = phase.forms > 0
            else:
                ok = False
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"phase {part!r}: expected steady:<rate>:<seconds> or burst:<forms>, positive numbers")
        if phase.kind == "steady" and phases:
            raise ValueError(f"phase {part!r}: a steady phase must come first (at most one)")
        phases.append(phase)
    return phases


# bench_pipeline.AUDIT_MODES, which start_pipeline takes; not imported here: the driver loads no
# harness, each revision's own runs in its child (tests/unit/test_ab_pipeline.py keeps them equal)
AUDIT_MODES = ("in-worker", "separate", "off")


@dataclass(frozen=True)
class Setup:
    """How a side's pipeline runs: where the audit agent runs, how many workers share the work."""

    audit: str = "in-worker"
    workers: int = 1

    @property
    def name(self) -> str:
        return "" if self == Setup() else f"audit={self.audit},workers={self.workers}"


def parse_setup(text: str) -> Setup:
    """``audit=separate,workers=2`` → a :class:`Setup` (empty: the defaults); a clear error else."""
    fields: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition("=")
        if name == "audit" and value in AUDIT_MODES:
            fields["audit"] = value
        elif name == "workers" and value.isdigit() and int(value) >= 1:
            fields["workers"] = int(value)
        else:
            raise ValueError(
                f"setup {part!r}: expected audit=<{'|'.join(AUDIT_MODES)}> or workers=<n ≥ 1>, comma-separated"
            )
    return Setup(**fields)


def summarise(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[str]:
    """One line per revision and phase: every run's figure in order, then the worker's CPU per row
    change (the figure the VM's drift moves least)."""
    lines = []
    phases = [k for k in runs[0]["phases"]] if runs else []
    for phase in phases:
        for label in labels:
            mine = [r["phases"][phase] for r in runs if r["label"] == label and phase in r["phases"]]
            if phase.startswith("steady"):
                figure = "p99 " + " / ".join(f"{m['latency_ms']['p99']:,.0f}" for m in mine) + " ms"
                figure += "; p50 " + " / ".join(f"{m['latency_ms']['p50']:,.0f}" for m in mine) + " ms"
            else:
                figure = " / ".join(f"{m['capacity']:,.0f}" for m in mine) + " row changes/s"
            worker = " / ".join(f"{m['cpu_ms_per_row_change_by_process'].get('workers', 0):.2f}" for m in mine)
            steal = " / ".join(f"{m['steal_percent']:g}" for m in mine)
            lines.append(f"{phase:18} {label:10} {figure}; worker {worker} ms per row change; steal {steal}%")
    return lines


# ------------------------------------------------------------------------------ one run (child)


def run_phases(phases: list[Phase], setup: Setup = Setup()) -> dict[str, Any]:
    """One fresh pipeline of this tree's code: warm-up, then the phases (run in a child process
    whose PYTHONPATH is the revision's worktree)."""
    from archsync.logs import configure_logging
    from archsync.settings import load_settings

    # the revision's own harness (its pipeline_kit starts its worker); only what every revision has
    from benchmarks.bench_pipeline import (
        capacity_phase,
        cleanup,
        items_done,
        start_pipeline,
        steady_phase,
        write_forms,
    )

    configure_logging("WARNING")
    tag = uuid.uuid4().hex[:8]
    warm = f"{tag}w"
    p = start_pipeline(load_settings(), tag, setup.audit, setup.workers)
    out: dict[str, Any] = {}
    try:
        write_forms(p, warm, 0, WARM_UP_FORMS)  # JIT, caches, first connections: not measured
        p.wait_for(lambda: items_done(p, warm) >= WARM_UP_FORMS, 300, "the warm-up")
        start = 0
        for phase in phases:
            if phase.kind == "steady":
                result = steady_phase(p, tag, phase.rate, phase.seconds)
                start += int(result["steady_forms"])  # type: ignore[call-overload]
            else:
                result = capacity_phase(p, tag, start, phase.forms)
                start += phase.forms
            out[phase.name] = result
    finally:
        cleanup(p, tag)
        cleanup(p, warm)  # the pipeline is stopped by then: only the warm-up's rows go
    return out


# ------------------------------------------------------------------------------ driver


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def _worktree(rev: str, base: Path) -> Path:
    if rev == WORKTREE:
        return REPO
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = base / commit[:12]
    if not path.exists():
        _git("worktree", "add", "--detach", "-f", str(path), commit)
        (path / ".venv").symlink_to(REPO / ".venv")
    return path


def _run_child(tree: Path, phases: str, setup: Setup) -> dict[str, Any]:
    # this file runs the phases (an older revision may not have it); the revision's code, on the
    # path first, is what runs: its harness, its pipeline, its worker
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--phases", phases, "--setup", setup.name],
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the run in {tree} failed (exit {proc.returncode}); its log is above")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="*", help="two revisions, A then B (WORKTREE: this tree as it is)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of A then B (default 2)")
    parser.add_argument("--phases", default="steady:1000:20,burst:3000", help="default steady:1000:20,burst:3000")
    for side in ("a", "b"):
        parser.add_argument(
            f"--setup-{side}",
            default="",
            help=f"how {side.upper()} runs, e.g. audit=separate,workers=2 (default audit=in-worker,workers=1)",
        )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setup", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        phases = parse_phases(args.phases)
        setups = [parse_setup(args.setup_a), parse_setup(args.setup_b)]
        child_setup = parse_setup(args.setup)
    except ValueError as exc:
        parser.error(str(exc))
    if args.child:
        print(json.dumps(run_phases(phases, child_setup), default=str))
        return 0
    if len(args.revisions) != 2 or args.rounds < 1:
        parser.error("give two revisions (A and B) and --rounds of at least 1")
    base = Path(tempfile.mkdtemp(prefix="archsync-ab-"))
    labels = [
        " ".join(filter(None, [f"{side} {rev}", setup.name]))
        for side, rev, setup in zip("AB", args.revisions, setups, strict=True)
    ]
    trees = [_worktree(rev, base) for rev in args.revisions]
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for round_no in range(1, args.rounds + 1):
            for label, tree, setup in zip(labels, trees, setups, strict=True):
                print(f"[ab] round {round_no}/{args.rounds}: {label}", file=sys.stderr, flush=True)
                runs.append({"label": label, "round": round_no, "phases": _run_child(tree, args.phases, setup)})
    finally:
        for tree in trees:
            if tree != REPO:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    lines = summarise(runs, labels)
    result = {
        "benchmark": "ab_pipeline",
        "revisions": dict(zip(labels, args.revisions, strict=True)),
        "setups": {label: asdict(setup) for label, setup in zip(labels, setups, strict=True)},
        "phases": args.phases,
        "rounds": args.rounds,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "runs": runs,
        "summary": lines,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ab_pipeline.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

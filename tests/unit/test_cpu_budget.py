"""The benchmark's CPU accounting by process group (benchmarks/cpu_budget.py): pure parts."""

from __future__ import annotations

import os

from benchmarks.cpu_budget import CpuBudget, ProcStat, ceiling, read_procs, tree_ticks

# 1 (bench) ─┬─ 2 (worker) ── 3 (applier)
#            └─ 4 (capture helper)      10 (postmaster, reaped 50) ── 11 (backend)
PROCS = {
    1: ProcStat(ppid=0, own=100, reaped=7),
    2: ProcStat(ppid=1, own=200, reaped=0),
    3: ProcStat(ppid=2, own=30, reaped=0),
    4: ProcStat(ppid=1, own=5, reaped=0),
    10: ProcStat(ppid=0, own=2, reaped=50),
    11: ProcStat(ppid=10, own=40, reaped=0),
}


def test_a_tree_counts_its_live_descendants_and_what_it_reaped() -> None:
    assert tree_ticks(PROCS, 10) == 2 + 50 + 40
    assert tree_ticks(PROCS, 1) == 100 + 7 + 200 + 30 + 5


def test_nested_groups_are_subtracted_from_the_group_around_them() -> None:
    assert tree_ticks(PROCS, 1, frozenset({2})) == 100 + 7 + 5
    assert tree_ticks(PROCS, 2, frozenset({3})) == 200
    assert tree_ticks(PROCS, 2, frozenset({2, 3})) == 200  # a group's own root is never excluded
    assert tree_ticks(PROCS, 99) == 0  # gone


def test_ceiling_is_the_cores_over_the_cpu_a_row_change_needs() -> None:
    per_row = {"workers": 1.0, "kafka": 0.25, "postgres_archive": 0.25, "idle": 3.0}
    assert ceiling(per_row, ("workers", "kafka", "postgres_archive"), cores=2) == 1333
    assert ceiling(per_row, ("kafka", "postgres_archive"), cores=2) == 4000
    assert ceiling(per_row, ("missing",), cores=2) == 0


def test_budget_of_this_process_over_some_work() -> None:
    budget = CpuBudget({"me": (os.getpid(),)})
    budget.start()
    sum(i * i for i in range(300_000))
    out = budget.stop(units=1000)
    assert set(out) == {"me", "other", "idle", "steal"}
    assert all(v >= 0 for v in out.values())
    assert os.getpid() in read_procs()

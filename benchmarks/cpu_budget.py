"""Where a machine's CPU went during a benchmark phase, per process group, from /proc.

A group is a process with all its descendants, the live ones and the ones it reaped (a
PostgreSQL backend that ended is counted in its postmaster's ``cutime``/``cstime``), less the
groups inside it (the benchmark process contains the worker, the worker its applier processes).
Used by ``bench_pipeline`` to say what each part of the pipeline costs per row change, and so
what rate the machine could reach at best: all of its cores divided by the CPU a row change needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    own: int  # utime + stime, ticks
    reaped: int  # cutime + cstime: children it waited for


def read_procs() -> dict[int, ProcStat]:
    """Every process's parent and CPU ticks (processes that vanish while read are skipped)."""
    out: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # from the state field on
        out[int(entry)] = ProcStat(int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    return out


def machine_ticks() -> list[int]:
    """/proc/stat ``cpu`` line: user nice system idle iowait irq softirq steal, in ticks."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def children_of(procs: Mapping[int, ProcStat]) -> dict[int, list[int]]:
    """Each process's children (by parent pid)."""
    children: dict[int, list[int]] = {}
    for pid, stat in procs.items():
        children.setdefault(stat.ppid, []).append(pid)
    return children


def tree_ticks(
    procs: Mapping[int, ProcStat],
    root: int,
    exclude: frozenset[int] = frozenset(),
    children: Mapping[int, list[int]] | None = None,
) -> int:
    """CPU ticks of ``root``, its reaped children and its live descendants, less the subtrees
    rooted at ``exclude`` (their reaped children included: a subtree's reaped CPU sits in its root)."""
    if root not in procs:
        return 0
    if children is None:
        children = children_of(procs)
    total = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in exclude and pid != root:
            continue
        total += procs[pid].own + procs[pid].reaped
        stack.extend(children.get(pid, []))
    return total


def find_process(marker: str) -> int | None:
    """The oldest process whose command line contains ``marker`` (e.g. ``kafka.Kafka``)."""
    found: list[tuple[float, int]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            start = float(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[19])
        except (OSError, IndexError, ValueError):
            continue
        if marker in cmdline:
            found.append((start, int(entry)))
    return min(found)[1] if found else None


def parent_of(pid: int) -> int | None:
    """A process's parent (a PostgreSQL backend's parent is its postmaster)."""
    stat = read_procs().get(pid)
    return stat.ppid if stat else None


@dataclass
class CpuBudget:
    """CPU per group between :meth:`start` and :meth:`stop`. ``groups`` maps a name to its root
    processes; a group nested in another is subtracted from it."""

    groups: dict[str, tuple[int, ...]]
    _procs: dict[int, ProcStat] = field(default_factory=dict)
    _machine: list[int] = field(default_factory=list)

    def _ticks(self, procs: Mapping[int, ProcStat]) -> dict[str, int]:
        roots = frozenset(pid for pids in self.groups.values() for pid in pids)
        children = children_of(procs)
        return {
            name: sum(tree_ticks(procs, pid, roots - {pid}, children) for pid in pids)
            for name, pids in self.groups.items()
        }

    def start(self) -> None:
        self._procs, self._machine = read_procs(), machine_ticks()

    def stop(self, units: int) -> dict[str, float]:
        """ms of CPU per unit (row change) for each group, the rest of the machine's busy time
        (``other``), its idle time and the hypervisor's steal, all per unit."""
        before, after = self._ticks(self._procs), self._ticks(read_procs())
        machine = [b - a for a, b in zip(self._machine, machine_ticks(), strict=True)]

        def ms(ticks: float) -> float:
            return round(ticks * 1000 / TICKS / max(units, 1), 3)

        out = {name: ms(max(0, after[name] - before[name])) for name in self.groups}
        busy = machine[0] + machine[1] + machine[2] + machine[5] + machine[6]
        out["other"] = max(0.0, round(ms(busy) - sum(out.values()), 3))
        out["idle"] = ms(machine[3] + machine[4])
        out["steal"] = ms(machine[7])
        return out


def ceiling(per_unit: Mapping[str, float], groups: tuple[str, ...], cores: int | None = None) -> int:
    """Units per second the machine's cores could carry at most if only ``groups`` used CPU."""
    need = sum(per_unit.get(g, 0.0) for g in groups)
    return round((cores or os.cpu_count() or 1) * 1000 / need) if need > 0 else 0

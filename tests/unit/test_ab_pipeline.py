"""The A/B benchmark's phase syntax and its summary (pure; the runs themselves need the services)."""

import re

import pytest

from benchmarks.ab_pipeline import Phase, Setup, parse_phases, parse_setup, summarise


def test_phases_parse_in_order_with_clear_errors() -> None:
    expected = [Phase("steady", rate=1000, seconds=20.0), Phase("burst", forms=3000)]
    assert parse_phases("steady:1000:20,burst:3000") == expected
    assert [p.name for p in parse_phases("burst:500, burst:100")] == ["burst:500", "burst:100"]
    for bad in ("steady:1000", "burst:0", "burst:x", "warp:9", "steady:-1:5"):
        with pytest.raises(ValueError, match="expected steady:<rate>:<seconds> or burst:<forms>"):
            parse_phases(bad)
    with pytest.raises(ValueError, match="a steady phase must come first"):
        parse_phases("burst:100,steady:200:5")


def test_summary_lists_each_revision_s_runs_in_order() -> None:
    def run(label: str, p99: float, cap: float, worker: float) -> dict[str, object]:
        cpu = {"workers": worker}
        return {
            "label": label,
            "phases": {
                "steady:1000:20": {
                    "latency_ms": {"p50": p99 / 2, "p99": p99},
                    "cpu_ms_per_row_change_by_process": cpu,
                    "steal_percent": 0.5,
                },
                "burst:3000": {"capacity": cap, "cpu_ms_per_row_change_by_process": cpu, "steal_percent": 1.0},
            },
        }

    runs = [run("A x", 5200, 857, 1.0), run("B y", 4800, 824, 0.95), run("A x", 6700, 882, 1.03)]
    lines = summarise(runs, ["A x", "B y"])
    assert lines[0].startswith("steady:1000:20     A x        p99 5,200 / 6,700 ms; p50 2,600 / 3,350 ms")
    assert "worker 1.00 / 1.03 ms per row change; steal 0.5 / 0.5%" in lines[0]
    assert lines[1].startswith("steady:1000:20     B y        p99 4,800 ms")
    assert lines[2].startswith("burst:3000         A x        857 / 882 row changes/s")
    assert len(lines) == 4


def test_setups_parse_with_defaults_and_clear_errors() -> None:
    assert parse_setup("") == Setup() and Setup().name == ""
    both = parse_setup("audit=separate, workers=2")
    assert both == Setup("separate", 2) and both.name == "audit=separate,workers=2"
    assert parse_setup("workers=3") == Setup("in-worker", 3)
    for bad in ("audit=elsewhere", "workers=0", "workers=two", "cores=2"):
        with pytest.raises(ValueError, match=re.escape("expected audit=<in-worker|separate|off> or workers=<n ≥ 1>")):
            parse_setup(bad)


def test_setup_audit_modes_are_the_harness_s() -> None:
    from benchmarks import ab_pipeline, bench_pipeline

    assert ab_pipeline.AUDIT_MODES == bench_pipeline.AUDIT_MODES

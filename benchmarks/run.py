"""`make bench`: every benchmark, results in benchmarks/results/, summary printed."""

from __future__ import annotations

from benchmarks import bench_applier, bench_audit, bench_capture, bench_pipeline, bench_state


def main() -> None:
    bench_capture.main()
    bench_applier.main()
    bench_pipeline.main()
    bench_state.main([])
    bench_audit.main([])


if __name__ == "__main__":
    main()

"""The benchmarks' arithmetic and report: percentiles, pooled statistics, and results.md/plots from results."""

from __future__ import annotations

import math
from pathlib import Path

from bench import plots, report
from bench.bedprobe import BedProbe, Engine
from bench.loadgen import Sample, Stats, Target, percentile
from bench.samplers import BusySampler
from slinfer.dev import devcluster


def test_percentile_is_nearest_rank_and_ignores_nan() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([*values, math.nan], 1.0) == 100.0
    assert math.isnan(percentile([], 0.5))


def test_stats_count_only_successes_and_pool_spans() -> None:
    burst1 = [Sample(0.0, 1.0, 200, ttft=0.2), Sample(0.0, 2.0, 200, ttft=0.4), Sample(0.0, 0.5, 429)]
    burst2 = [Sample(10.0, 13.0, 200, ttft=0.6)]
    one = Stats.of(burst1)
    assert (one.requests, one.errors, one.error_kinds) == (3, 1, {"429": 1})
    assert one.mean == 1.5 and one.throughput == 1.0  # 2 successes over a 2 s span
    pooled = Stats.pooled([burst1, burst2])
    assert pooled.throughput == 3 / 5  # 2 s + 3 s of spans, not the 13 s between them
    assert pooled.ttft_p50 == 0.4 and pooled.p99 == 3.0


def _results() -> dict[str, object]:
    line = {"level": 100.0, "seed_mean": 1.2, "overhead_mean": 0.01, "overhead_p50": 0.01, "overhead_p99": 0.02,
            "overhead_ttft_p50": 0.0, "overhead_vs_seed": 0.02}
    for path in ("direct", "gateway"):
        line.update({f"{path}_{k}": 0.5 for k in ("mean", "p50", "p99", "ttft_mean", "ttft_p50", "ttft_p99")})
        line.update({f"{path}_throughput": 100.0, f"{path}_errors": 0.0})
    return {
        "meta": {"machine": {"cpus": 2, "cpu_model": "x", "memory_gib": 24}, "uptime_start": "load average: 1",
                 "started": 0.0, "minutes": 1.0, "state_dir": "/tmp/b", "port_base": 1},
        "seedtable": {"engine_job": "7", "max_tokens": 16, "repeats": 1, "table": [line],
                      "rows": [{"level": 100, "path": "direct", "stream": False, "engine_busy_fraction": 0.9,
                                "mean": 0.4, "error_kinds": {}},
                               {"level": 100, "path": "direct", "stream": False, "engine_busy_fraction": 0.9,
                                "mean": 0.6, "error_kinds": {"ServerDisconnectedError": 2}}]},
        "routing": [{"policy": p, "groups": 2, "per_group": 2, "users": 4, "max_tokens": 16, "ttft_mean": 0.1,
                     "ttft_p50": 0.1, "ttft_p99": 0.2, "p50": 0.3, "throughput": 10.0, "prefix_hit_rate": 0.5,
                     "per_engine": {"1": {"requests": 2.0}, "2": {"requests": 2.0}}, "errors": 0}
                    for p in ("round_robin", "least_outstanding", "prefix_affinity")],
    }


def test_report_and_plots_from_results(tmp_path: Path) -> None:
    results = _results()
    drawn = plots.draw_all(results, tmp_path)
    assert drawn == ["seed_table.png", "routing.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in drawn)
    text = report.markdown(results, drawn)
    assert "| 100 | gateway | 0.500 |" in text
    assert "| 100 | direct | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 100 | 2 ServerDisconnectedError | 0.40, 0.60 |" \
        in text
    assert "| 100 | +10 | +10 | +20 | +0 | +0.02 | 200 |" in text
    assert "| prefix affinity |" in text
    assert "Plots not drawn (their part has no results): engine_busy.png, scaling_timeline.png." in text


def test_busy_fraction_weighs_each_sample_by_the_time_until_the_next() -> None:
    engine = Engine("5", Target("engine 5", "http://e/v1", "k"), "http://e")
    sampler = BusySampler(BedProbe(devcluster.Bed(Path("/nonexistent")), "tiny"), [engine])
    # Busy from 0 to 3 s (one late sample), idle from 3 to 4 s (four quick samples), window end at 4 s.
    sampler.rows = [(0.0, "5", 3.0, 0.0), (3.0, "5", 0.0, 0.0), (3.25, "5", 0.0, 0.0), (3.5, "5", 0.0, 0.0),
                    (3.75, "5", 0.0, 1.0)]
    busy = sampler.busy(0.0, 4.0)["5"]
    assert busy["busy_fraction"] == 0.75
    assert busy["busy_sample_share"] == 0.2
    assert busy["samples"] == 5 and busy["mean_waiting"] == 0.2


def test_vllm_serve_table_averages_each_paths_runs_and_takes_ratios_per_level(tmp_path: Path) -> None:
    from bench import vllm_serve_table as table

    def row(level: int, path: str, tps: float, ttft: float, failed: int = 0) -> dict[str, object]:
        return {"level": level, "path": path, "output_throughput": tps, "request_throughput": tps / 16,
                "mean_ttft_ms": ttft, "p99_ttft_ms": ttft * 2, "failed": failed, "completed": 200 - failed}
    rows = [row(100, "direct", 1000, 100), row(100, "gateway", 900, 150), row(100, "direct", 1200, 300),
            row(100, "gateway", 1100, 250, failed=2), row(500, "gateway", 500, 40), row(500, "direct", 1000, 20)]
    first, second = table.summarise(rows)
    assert first["level"] == 100 and first["direct_output_throughput"] == 1100
    assert first["throughput_ratio"] == 1000 / 1100 and first["ttft_ratio"] == 1.0
    assert first["gateway_failed"] == 1 and first["ttft_added_s"] == 0.0
    assert second["throughput_ratio"] == 0.5 and second["ttft_ratio"] == 2.0 and second["ttft_added_s"] == 0.02
    text = table.markdown([first, second])
    assert "| 100 | 1100 | 1000 | 0.91 |" in text and "| 0 / 1 |" in text
    table.plot([first, second], tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000

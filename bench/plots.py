"""The benchmarks' PNG figures (matplotlib, Agg), drawn from the results dictionary run_all writes as JSON.

One function per figure; `draw_all` draws those whose part has results and returns their file names. It
measures nothing and decides nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DPI = 80  # small files: the committed copy must stay well under 1 MB
GATEWAY, DIRECT = "tab:orange", "tab:blue"
STATES = (("pending", "tab:gray"), ("starting", "tab:olive"), ("ready", "tab:green"), ("draining", "tab:red"))


def draw_all(results: dict[str, Any], out: Path) -> list[str]:
    drawn = []
    for key, name, draw in (("seedtable", "seed_table.png", seed_table), ("scaling", "scaling_timeline.png", scaling),
                            ("routing", "routing.png", routing), ("peakbusy", "engine_busy.png", engine_busy)):
        if results.get(key):
            fig = draw(results[key])
            fig.savefig(out / name, dpi=DPI, bbox_inches="tight")
            plt.close(fig)
            drawn.append(name)
    return drawn


def _bars(ax: Any, labels: list[str], series: dict[str, tuple[list[float], str]], ylabel: str) -> None:
    width = 0.8 / len(series)
    for i, (name, (values, color)) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values, width, label=name, color=color)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def seed_table(r: dict[str, Any]) -> Any:
    table = r["table"]
    labels = [f"{int(t['level'])}" for t in table]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    series = {}
    for stat in ("mean", "p50", "p99"):
        for path, color in (("direct", DIRECT), ("gateway", GATEWAY)):
            series[f"{path} {stat}"] = ([t[f"{path}_{stat}"] for t in table], color)
    width = 0.8 / len(series)
    for i, (name, (values, color)) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values, width, label=name, color=color, alpha=[1.0, 0.7, 0.45][i // 2])
    ax.plot(range(len(labels)), [t["seed_mean"] for t in table], "k*", markersize=10, label="seed paper mean (7B, GPU)")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("concurrent requests (one burst)")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title("Latency, non-streaming")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    _bars(axes[1], labels, {"direct TTFT p50": ([t["direct_ttft_p50"] for t in table], DIRECT),
                            "gateway TTFT p50": ([t["gateway_ttft_p50"] for t in table], GATEWAY)}, "TTFT (s)")
    axes[1].plot([x - 0.2 for x in range(len(labels))], [t["direct_ttft_p99"] for t in table], "v", color=DIRECT,
                 label="direct p99")
    axes[1].plot([x + 0.2 for x in range(len(labels))], [t["gateway_ttft_p99"] for t in table], "v",
                 color=GATEWAY, label="gateway p99")
    axes[1].set_title("Time to first token, streaming")
    axes[1].set_xlabel("concurrent requests (one burst)")
    axes[1].legend(fontsize=7)
    _bars(axes[2], labels, {"direct": ([t["direct_throughput"] for t in table], DIRECT),
                            "gateway": ([t["gateway_throughput"] for t in table], GATEWAY)}, "requests/s")
    axes[2].set_title("Throughput of the burst")
    axes[2].set_xlabel("concurrent requests (one burst)")
    axes[2].legend(fontsize=7)
    fig.suptitle("Seed table on the bed: tiny model, 1 replica (CPU vLLM), gateway vs the same engine directly")
    return fig


def scaling(r: dict[str, Any]) -> Any:
    rows = r["timeline"]
    t0 = r["load_start"]
    t = [row["t"] - t0 for row in rows]
    fig, axes = plt.subplots(4, 1, figsize=(12, 11), sharex=True)
    ax = axes[0]
    ax.step(t, [row["users"] for row in rows], where="post", color="k", label="offered load (closed-loop users)")
    ax.set_ylabel("users")
    ax2 = ax.twinx()
    ax2.plot(t, [row["rate"] for row in rows], color="tab:purple", alpha=0.7, label="completed requests/s")
    ax2.set_ylabel("requests/s")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax.set_title(f"Load step 0 -> {r['users']} users -> 0 through the gateway, from zero replicas "
                 f"(target 8 outstanding per replica, max 2)")
    axes[1].plot(t, [row["queued"] for row in rows], label="queued at the gateway", color="tab:red")
    axes[1].plot(t, [row["in_flight"] for row in rows], label="in flight to engines", color="tab:blue")
    axes[1].plot(t, [row["load"] for row in rows], label="autoscaler load (moving average)", color="tab:gray",
                 linestyle="--")
    axes[1].set_ylabel("requests")
    axes[1].legend(fontsize=8)
    axes[2].stackplot(t, *[[row[s] for row in rows] for s, _ in STATES], labels=[s for s, _ in STATES],
                      colors=[c for _, c in STATES], step="post")
    axes[2].step(t, [row["desired"] for row in rows], where="post", color="k", linestyle=":", label="desired")
    axes[2].set_ylabel("replicas")
    axes[2].legend(fontsize=8, loc="upper left")
    axes[3].plot(t, [row["p99"] for row in rows], color="tab:brown", label="p99 latency, last 5 s of completions")
    axes[3].set_ylabel("seconds")
    axes[3].set_yscale("log")
    axes[3].legend(fontsize=8)
    axes[3].set_xlabel("seconds since the load step")
    for rep in r["replicas"]:
        for key, style in (("sbatch_at", ":"), ("ready_s", "-")):
            if rep.get(key) is not None:
                for ax in axes:
                    ax.axvline(rep[key], color="tab:green" if key == "ready_s" else "tab:gray", linestyle=style,
                               alpha=0.6)
    for ax in axes:
        ax.axvspan(0, r["load_stop"] - t0, color="tab:orange", alpha=0.06)
        ax.grid(alpha=0.3)
    fig.text(0.01, 0.005, "dotted: sbatch of a replica; solid green: its engine READY; shaded: load on",
             fontsize=8)
    return fig


def routing(rows: list[dict[str, Any]]) -> Any:
    labels = [r["policy"].replace("_", " ") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    _bars(axes[0], labels, {"TTFT p50": ([r["ttft_p50"] for r in rows], "tab:blue"),
                            "TTFT mean": ([r["ttft_mean"] for r in rows], "tab:cyan"),
                            "TTFT p99": ([r["ttft_p99"] for r in rows], "tab:purple")}, "seconds")
    axes[0].set_title("Time to first token")
    axes[0].legend(fontsize=8)
    _bars(axes[1], labels, {"throughput": ([r["throughput"] for r in rows], "tab:green")}, "requests/s")
    axes[1].set_title("Throughput")
    _bars(axes[2], labels, {"prefix-cache hit rate": ([100 * r["prefix_hit_rate"] for r in rows], "tab:orange")},
          "% of prompt tokens")
    axes[2].set_title("vLLM prefix-cache hits (both engines)")
    first = rows[0]
    fig.suptitle(f"Routing on shared prefixes: {first['groups']} system prompts x {first['per_group']} requests, "
                 f"{first['users']} users, 2 replicas")
    return fig


def engine_busy(r: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(14, 4), gridspec_kw={"width_ratios": [3, 1]})
    jobs = sorted(r["engines"])
    for job in jobs:
        pts = [(row[0] - r["start"], row[2]) for row in r["trace"] if row[1] == job]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=f"engine of job {job}", linewidth=0.8,
                     drawstyle="steps-post", marker=".", markersize=3)
    axes[0].axvspan(0, r["end"] - r["start"], color="tab:orange", alpha=0.06)
    axes[0].set_xlabel("seconds (shaded: measured window)")
    axes[0].set_ylabel("vllm:num_requests_running")
    axes[0].set_title(f"Running requests per engine, {r['users']} users through the gateway (one dot per sample)")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    values = [100 * r["engines"][j]["busy_fraction"] for j in jobs]
    axes[1].bar([f"job {j}" for j in jobs], values, color="tab:green")
    axes[1].axhline(100 * r["seed"], color="k", linestyle="--", label="seed paper: >85 % GPU utilisation")
    axes[1].set_ylim(0, 105)
    axes[1].set_ylabel("% of time with >= 1 running request")
    axes[1].set_title("Busy fraction")
    axes[1].legend(fontsize=8, loc="lower right")
    for i, v in enumerate(values):
        if not math.isnan(v):
            axes[1].text(i, v + 1, f"{v:.1f}%", ha="center", fontsize=9)
    return fig

"""Benchmark part 3: routing quality on a workload with shared prompt prefixes, per balancer policy.

Responsible for: building the workload (G system prompts of about 420 tokens, each shared by K requests that
differ only in the user's question, shuffled), running it through the gateway under one policy with a fixed
number of users, and reading what each engine did (requests served, vLLM's prefix-cache queries and hits).
Each policy gets its own system prompts (same lengths), so that no policy finds prefixes that an earlier
one left in the engines' caches. Not responsible for: switching the controller's policy (run_all restarts
it through BedProbe) or plotting.
"""

from __future__ import annotations

import logging
import random

from bench.bedprobe import BedProbe, Engine, metric_sum
from bench.loadgen import LoadGenerator, Messages, Stats

log = logging.getLogger("bench.routing")
_WORDS = ("slurm job node gpu partition queue account scheduler memory engine model request token replica "
          "cluster batch priority limit time user group share cache prefix answer question policy").split()
# About 420 tokens with the tiny model's tokenizer: most of its 512-token context, leaving room to answer.
_SYSTEM_WORDS = 90


def workload(seed: str, groups: int, per_group: int) -> list[Messages]:
    rng = random.Random(seed)
    systems = [f"System prompt {seed}-{g}. " + " ".join(rng.choice(_WORDS) for _ in range(_SYSTEM_WORDS))
               for g in range(groups)]
    requests = [[{"role": "system", "content": systems[g]},
                 {"role": "user", "content": f"Question {k}: how do I cancel job {rng.randrange(10000)}?"}]
                for g in range(groups) for k in range(per_group)]
    rng.shuffle(requests)
    return requests


async def _engine_counters(probe: BedProbe, engines: list[Engine]) -> dict[str, dict[str, float]]:
    out = {}
    for e in engines:
        values = await probe.engine_metrics(e)
        out[e.job_id] = {"requests": metric_sum(values, "vllm:request_success_total"),
                         "prefix_queries": metric_sum(values, "vllm:prefix_cache_queries_total"),
                         "prefix_hits": metric_sum(values, "vllm:prefix_cache_hits_total")}
    return out


async def run(probe: BedProbe, policy: str, groups: int, per_group: int, users: int,
              max_tokens: int) -> dict[str, object]:
    engines = await probe.engines()
    gen = LoadGenerator(probe.gateway, probe.model, max_tokens=max_tokens)
    try:
        bodies = [gen.body(m, True) for m in workload(policy, groups, per_group)]
        before = await _engine_counters(probe, engines)
        samples = await gen.through(bodies, users, stream=True)
        after = await _engine_counters(probe, engines)
    finally:
        await gen.close()
    per_engine = {job: {k: after[job][k] - before[job][k] for k in after[job]} for job in after}
    queries = sum(e["prefix_queries"] for e in per_engine.values())
    hits = sum(e["prefix_hits"] for e in per_engine.values())
    stats = Stats.of(samples)
    result = {"policy": policy, "groups": groups, "per_group": per_group, "users": users, "max_tokens": max_tokens,
              **stats.as_dict(), "per_engine": per_engine,
              "prefix_hit_rate": hits / queries if queries else float("nan")}
    log.info("%-17s TTFT p50 %.3fs p99 %.3fs, latency p50 %.3fs, %.1f req/s, prefix-cache hits %.1f%%, "
             "requests per engine %s, %d errors", policy, stats.ttft_p50, stats.ttft_p99, stats.p50,
             stats.throughput, 100 * result["prefix_hit_rate"],  # type: ignore[operator]
             {j: int(e["requests"]) for j, e in per_engine.items()}, stats.errors)
    return result

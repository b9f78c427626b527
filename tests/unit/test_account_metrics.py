"""Prometheus counters per Slurm account on the gateway's /metrics (requests by status, prompt and completion
tokens), counted from the same answers the usage ledger charges."""

from __future__ import annotations

import re

import aiohttp
import test_usage
from test_usage import register

bed = test_usage.bed  # the fixture: a gateway with a Limiter and a UsageLedger


async def _scrape(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    out = {}
    for m in re.finditer(r'^(slinfer_account_\w+_total)\{([^}]*)\} (\S+)$', text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        labels.pop("instance", None)
        out[m.group(1) + str(sorted(labels.items()))] = float(m.group(3))
    return out


def _series(name: str, **labels: str) -> str:
    return f"slinfer_account_{name}_total" + str(sorted(labels.items()))


async def test_requests_and_tokens_are_counted_per_account(bed, standins, http, engine_pb) -> None:
    b = await bed()
    engine = await standins(model="m", tokens=6)
    await register(b, engine.base_url, engine_pb)
    _, alice = b.keys.create("alice", account="acct-metrics-physics")
    _, bob = b.keys.create("bob", account="acct-metrics-chem")
    before = await _scrape(http, b.url)
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for key, stream in ((alice, False), (alice, True), (bob, False)):
        async with http.post(f"{b.url}/v1/chat/completions", json={**chat, "stream": stream},
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200
            await resp.read()
    async with http.post(f"{b.url}/v1/chat/completions", json={"model": "nope", "messages": []},
                         headers={"Authorization": f"Bearer {bob}"}) as resp:
        assert resp.status == 404
    after = await _scrape(http, b.url)

    def grew(series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    assert grew(_series("requests", account="acct-metrics-physics", model="m", code="200")) == 2
    assert grew(_series("requests", account="acct-metrics-chem", model="m", code="200")) == 1
    assert grew(_series("requests", account="acct-metrics-chem", model="", code="404")) == 1
    # The ledger's counts for the same answers: the series and the bill agree.
    charged = {r.account: (r.prompt_tokens, r.completion_tokens) for r in b.ledger.query() if r.model == "m"}
    physics = charged["acct-metrics-physics"]
    assert physics[1] > 0
    assert grew(_series("tokens", account="acct-metrics-physics", model="m", kind="completion")) == physics[1]
    assert grew(_series("tokens", account="acct-metrics-physics", model="m", kind="prompt")) == physics[0]
    assert grew(_series("tokens", account="acct-metrics-chem", model="m", kind="completion")) == \
        charged["acct-metrics-chem"][1]

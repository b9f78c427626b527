"""Fair shares under overload on the real bed (issue 30): account A floods the tiny model with 64 concurrent
requests while account B sends one, through two `slinfer-gateway` tiers fed by the bed's controller and routing
to the same single tiny replica, each letting 2 requests at a time reach the engine
(max_outstanding_per_engine = 2, so the rest wait in the tier's queue): one with [gateway].queue_policy "fair",
one with "fifo". B's latency and finishing place under each are printed side by side."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed, wait_until

pytestmark = pytest.mark.bed
MODEL = "tiny"
# The two tiers' ports: clear of the bed's own (port_base + 17..20, 80, 90, 91, 1000-1999), test_gateway_tier's
# (82) and test_identity_keys' (84).
FAIR_OFFSET, FIFO_OFFSET = 86, 87
# Requests that reach the engine at once through each tier: the rest of A's flood waits in the tier's queue.
AT_ONCE = 2
# A's flood, as the issue states it.
FLOOD = 64
# B's request is sent once this many of A's requests wait in the tier's queue (its /metrics says so): most of the
# flood, whatever the engine's speed.
FLOOD_QUEUED = FLOOD // 2
# The account whose [gateway.accounts] entry allows only the tiny model, 2 requests a minute.
LIMITED = "limited"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0.0}


def _tier_config(bed: SlurmBed, policy: str) -> str:
    """The bed's config with the tier's [gateway] settings added: a copy the tier reads, root's only."""
    text = bed.bed.config.read_text()
    assert "\n[gateway]\n" in text
    text = text.replace("\n[gateway]\n", f'\n[gateway]\nqueue_policy = "{policy}"\n'
                                         f"max_outstanding_per_engine = {AT_ONCE}\n", 1)
    # An account with limits of its own (test_account_limits_at_a_tier_worker).
    text += (f'\n[gateway.accounts.{LIMITED}]\nmodels = ["{MODEL}"]\nrequests_per_minute = 2\n')
    path = bed.bed.state / f"slinfer-{policy}.toml"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def _post(url: str, secret: str, model: str = MODEL) -> int:
    return _answer(url, secret, model)[0]


def _answer(url: str, secret: str, model: str = MODEL) -> tuple[int, dict[str, str]]:
    """The status, and the OpenAI error of a refusal ({} for a 200)."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps({**CHAT, "model": model}).encode(),
                                     headers={"Authorization": f"Bearer {secret}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            return int(response.status), {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)["error"]


def _known(url: str, secret: str) -> bool:
    """Whether the tier knows the key: GET /v1/models, which no rate limit counts."""
    request = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"})
    try:
        with urllib.request.urlopen(request, timeout=5):
            return True
    except urllib.error.HTTPError:
        return False


def _queued(url: str) -> int:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(r'^slinfer_gateway_queue_depth\{[^}]*model="tiny"[^}]*\} (\S+)$', text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def _key(bed: SlurmBed, account: str) -> str:
    out = bed.run(sys.executable, "-m", "slinfer.cli.main", "keys", "create", f"fair-{account}", "--account",
                  account).stdout
    match = re.search(r"secret: (\S+)", out)
    assert match, out
    return match.group(1)


@pytest.fixture(scope="module")
def tiers(slurm_bed: SlurmBed) -> Iterator[dict[str, str]]:
    bed = slurm_bed.bed
    slurm_bed.cleanup_jobs()
    slurm_bed.admin("scale", MODEL, "1")  # one replica pinned: the flood must not scale it up
    urls = {}
    try:
        for policy, offset in (("fair", FAIR_OFFSET), ("fifo", FIFO_OFFSET)):
            port = bed.port_base + offset
            devcluster.launch(bed, f"gateway-{policy}", [
                str(devcluster._bin_dir() / "slinfer-gateway"), "--config", _tier_config(slurm_bed, policy),
                "--listen", f"127.0.0.1:{port}", "--workers", "1"])
            urls[policy] = f"http://127.0.0.1:{port}"
        wait_until("the tiny replica", lambda: slurm_bed.ready_replicas(MODEL) >= 1, 300, 1.0)
        for policy in urls:
            devcluster._wait_for(f"the {policy} tier", lambda p=policy: devcluster._port_open(  # type: ignore[misc]
                bed.port_base + (FAIR_OFFSET if p == "fair" else FIFO_OFFSET)), 90)
        yield urls
    finally:
        for policy in ("fair", "fifo"):
            devcluster.stop_daemon(bed, f"gateway-{policy}", grace=30)
        slurm_bed.admin("scale", MODEL, "auto")
        slurm_bed.retire_models(MODEL)


def _flood_and_one(url: str, key_a: str, key_b: str) -> tuple[float, int, list[int]]:
    """A's flood, then B's one request: B's latency, B's finishing place among all 65, and every status."""
    finished: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def ask(secret: str, who: str) -> None:
        status = _post(url, secret)
        with lock:
            finished.append(who)
            statuses.append(status)

    flood = [threading.Thread(target=ask, args=(key_a, "A")) for _ in range(FLOOD)]
    for t in flood:
        t.start()
    wait_until("A's flood queued", lambda: _queued(url) >= FLOOD_QUEUED, 60, 0.01)
    began = time.monotonic()
    ask(key_b, "B")
    latency = time.monotonic() - began
    for t in flood:
        t.join(300)
    return latency, finished.index("B") + 1, statuses


def test_a_lone_request_of_b_is_served_before_a_flood_of_a_only_under_fair(slurm_bed: SlurmBed,
                                                                          tiers: dict[str, str]) -> None:
    key_a, key_b = _key(slurm_bed, "physics"), _key(slurm_bed, "chem")
    for url in tiers.values():
        wait_until("the tier knowing both keys", lambda u=url: _post(u, key_a) == 200  # type: ignore[misc]
                   and _post(u, key_b) == 200, 30, 0.2)
    began = time.monotonic()
    results = {policy: _flood_and_one(url, key_a, key_b) for policy, url in tiers.items()}
    took = time.monotonic() - began
    for policy, (_, _, statuses) in results.items():
        assert statuses.count(200) == FLOOD + 1, f"{policy}: {sorted(set(statuses))}"
    (fair_s, fair_at, _), (fifo_s, fifo_at, _) = results["fair"], results["fifo"]
    print(f"\nB's lone request under A's flood of {FLOOD} ({AT_ONCE} at a time on one tiny replica), same run: "
          f"fair {fair_s * 1000:.0f} ms (finished {fair_at} of {FLOOD + 1}) | "
          f"fifo {fifo_s * 1000:.0f} ms (finished {fifo_at} of {FLOOD + 1}); both floods {took:.1f} s")
    # Fair: B goes at its first turn after it joins, whatever A still has queued.
    assert fair_at <= FLOOD // 2, fair_at
    # The positive control: first come first served puts B behind every A request that was waiting.
    assert fifo_at > FLOOD // 2, fifo_at
    assert fair_s < fifo_s


def test_account_limits_at_a_tier_worker(slurm_bed: SlurmBed, tiers: dict[str, str]) -> None:
    """[gateway.accounts.limited] in the tier's config: a model it may not use gets 403 there, and its third
    request of the minute 429, each naming the config key."""
    secret = _key(slurm_bed, LIMITED)
    url = tiers["fair"]
    wait_until("the tier knowing the key", lambda: _known(url, secret), 30, 0.2)
    status, error = _answer(url, secret, "smollm2")  # in the catalog, not in the account's models
    assert status == 403 and error["code"] == "model_not_allowed", (status, error)
    assert f"[gateway.accounts.{LIMITED}].models" in error["message"]
    assert _answer(url, secret)[0] == 200  # the positive control: tiny is allowed (the 403 took one of the 2)
    status, error = _answer(url, secret)
    assert status == 429 and error["code"] == "rate_limit_exceeded", (status, error)
    assert f"[gateway.accounts.{LIMITED}].requests_per_minute" in error["message"]

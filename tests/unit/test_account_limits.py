"""Limits per Slurm account and per Slurm user from [gateway.accounts] and [gateway.users]: a shared rate, a daily
quota over all their keys, and the models allowed (controller/limits.py), then the 403 and 429 through a real
gateway, and the key's user carried to the tier's workers by the feed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import aiohttp

from slinfer.config import AccountConfig, GatewayConfig, ModelConfig, UserConfig
from slinfer.controller.balancer import Balancer
from slinfer.controller.gateway import Gateway
from slinfer.controller.keys import KeyInfo, KeyStore
from slinfer.controller.limits import GroupTokens, KeyLimits, Limiter
from slinfer.controller.proxy import Proxy
from slinfer.controller.queue import WaitQueue
from slinfer.controller.registry import Registry
from slinfer.controller.routefeed import RouteFeed
from slinfer.v1 import gateway_pb2

ALICE_NB = KeyInfo(key_id="k1", name="nb", account="physics", user="alice")
ALICE_CLI = KeyInfo(key_id="k2", name="cli", account="physics", user="alice")
BOB = KeyInfo(key_id="k3", name="bob", account="chem", user="bob")
ADMIN = KeyInfo(key_id="k4", name="svc")  # an administrator's key: no account, no user


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_an_accounts_rate_is_shared_by_its_keys_and_named_in_the_refusal() -> None:
    clock = Clock()
    limiter = Limiter(KeyLimits(), lambda k: 0, clock=clock, accounts={"physics": AccountConfig(requests_per_minute=3)})
    assert [limiter.check(k) for k in (ALICE_NB, ALICE_CLI, ALICE_NB)] == [None] * 3
    refusal = limiter.check(ALICE_CLI)  # the account's 4th request, from either key
    assert refusal is not None and refusal.code == "rate_limit_exceeded" and refusal.retry_after_s == 20
    assert "[gateway.accounts.physics].requests_per_minute" in refusal.message and "'physics'" in refusal.message
    assert limiter.check(BOB) is None and limiter.check(ADMIN) is None  # other accounts, and no account
    clock.t += 20.0
    assert limiter.check(ALICE_NB) is None


def test_the_star_entry_is_every_other_accounts_and_a_named_one_replaces_it() -> None:
    limiter = Limiter(KeyLimits(), lambda k: 0, clock=Clock(),
                      accounts={"*": AccountConfig(requests_per_minute=1), "physics": AccountConfig()})
    assert limiter.check(BOB) is None
    refusal = limiter.check(BOB)
    assert refusal is not None and '[gateway.accounts.*]' in refusal.message
    assert all(limiter.check(ALICE_NB) is None for _ in range(20))  # physics: its own entry, no limit
    assert all(limiter.check(ADMIN) is None for _ in range(20))  # a key without an account


def test_a_users_daily_quota_counts_all_their_keys(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.json")
    a1, _ = keys.create("nb", account="physics", user="alice")
    a2, _ = keys.create("cli", account="chem", user="alice")
    b1, _ = keys.create("b", account="chem", user="bob")
    used = {a1: 60, a2: 50, b1: 500}
    clock = Clock()
    limiter = Limiter(KeyLimits(), lambda k: used.get(k, 0), clock=clock, wall=lambda: 3 * 86400 + 3600.0,
                      users={"alice": UserConfig(tokens_per_day=100), "*": UserConfig(tokens_per_day=1000)},
                      group_tokens=GroupTokens(keys, lambda k: used.get(k, 0), clock=clock))
    alice = next(k for k in keys.list() if k.key_id == a1)
    refusal = limiter.check(alice)  # 60 + 50 >= 100, though each key alone is under it
    assert refusal is not None and refusal.code == "insufficient_quota" and refusal.retry_after_s == 23 * 3600
    assert "110 of its 100 tokens" in refusal.message and "[gateway.users.alice].tokens_per_day" in refusal.message
    bob = next(k for k in keys.list() if k.key_id == b1)
    assert limiter.check(bob) is None  # the positive control: bob's 500 are under the "*" entry's 1000
    used[b1] = 1000
    clock.t += 2.0  # past the sums' cache
    assert limiter.check(bob) is not None


def test_an_accounts_tokens_sum_over_its_keys_only(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.json")
    p1, _ = keys.create("p1", account="physics")
    p2, _ = keys.create("p2", account="physics")
    c1, _ = keys.create("c1", account="chem")
    used = {p1: 5, p2: 7, c1: 100}
    sums = GroupTokens(keys, used.__getitem__)
    assert sums("account", "physics") == 12 and sums("account", "chem") == 100 and sums("user", "alice") == 0


def test_models_allowed_by_account_and_user() -> None:
    limiter = Limiter(KeyLimits(), lambda k: 0, accounts={"physics": AccountConfig(models=["tiny"])},
                      users={"bob": UserConfig(models=["smollm2"])})
    assert limiter.model_refusal(ALICE_NB, "tiny") is None
    message = limiter.model_refusal(ALICE_NB, "smollm2")
    assert message is not None and "[gateway.accounts.physics].models" in message and "tiny" in message
    assert limiter.model_refusal(BOB, "smollm2") is None
    assert "[gateway.users.bob].models" in (limiter.model_refusal(BOB, "tiny") or "")
    assert limiter.model_refusal(ADMIN, "anything") is None


def test_the_feed_carries_a_keys_user_to_the_tier() -> None:
    feed = SimpleNamespace(mirror=SimpleNamespace(gateways=2), _share=RouteFeed._share)
    info = RouteFeed._key_info(feed, gateway_pb2.ClientKey(key_id="k", account="physics", user="alice",  # type: ignore[arg-type]
                                                           requests_per_minute=10))
    assert (info.user, info.account, info.requests_per_minute) == ("alice", "physics", 5)


async def test_the_gateway_answers_403_for_a_model_not_allowed_and_429_for_an_accounts_rate(
        tmp_path: Path, standins, engine_pb, http: aiohttp.ClientSession) -> None:
    import grpc
    from conftest import ReportClient

    from slinfer.controller.registry import RegistryService
    from slinfer.v1 import controller_pb2_grpc

    registry = Registry()
    keys = KeyStore(tmp_path / "keys.json")
    config = GatewayConfig()
    limiter = Limiter(KeyLimits(), lambda k: 0, accounts={"physics": AccountConfig(requests_per_minute=2,
                                                                                   models=["m"])})
    gateway = Gateway(config, [ModelConfig(name="m", source="/x"), ModelConfig(name="other", source="/y")],
                      registry, keys, Proxy(), Balancer(), WaitQueue(), limiter)
    server = grpc.aio.server()
    controller_pb2_grpc.add_RegistryServicer_to_server(RegistryService(registry, "t", 0.5), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    url = f"http://127.0.0.1:{await gateway.start('127.0.0.1', 0)}"
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        engine = await standins(model="m")
        client = ReportClient(channel, "node1", "t")
        await client.open()
        await client.send([engine_pb("1", "m", engine.base_url)])
        _, secret = keys.create("nb", account="physics", user="alice")
        headers = {"Authorization": f"Bearer {secret}"}

        async def ask(model: str) -> tuple[int, dict[str, object], str | None]:
            body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
                return resp.status, (await resp.json())["error"] if resp.status != 200 else {}, \
                    resp.headers.get("Retry-After")

        status, error, _ = await ask("other")
        assert status == 403 and error["code"] == "model_not_allowed" and error["type"] == "permission_error"
        assert "[gateway.accounts.physics].models" in str(error["message"]) and set(error) == {
            "message", "type", "param", "code"}
        assert engine.seen.requests == 0
        assert (await ask("m"))[0] == 200  # the positive control: an allowed model
        status, error, retry = await ask("m")  # the account's 2 per minute: the 403 above took one
        assert status == 429 and error["code"] == "rate_limit_exceeded" and retry == "30"
        assert "[gateway.accounts.physics].requests_per_minute" in str(error["message"])
        await client.close()
    finally:
        await channel.close()
        await gateway.stop()
        await server.stop(None)
